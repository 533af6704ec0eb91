"""``python -m benchmarks``: runs every scenario, prints progress and the table, writes JSON
and a PNG chart."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import cluster, report, scenarios, search


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the harness")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output dir")
    parser.add_argument(
        "--openhands-python",
        type=Path,
        default=os.environ.get("CONVSVC_BENCH_OPENHANDS_PYTHON") or None,
        help="python of a venv with openhands-ai and convclient, for the adapter row",
    )
    parser.add_argument(
        "--agents",
        action="append",
        metavar="VERSION=PYTHON",
        default=os.environ.get("CONVSVC_BENCH_AGENTS", "").split(),
        help="an OpenHands release and the python of a venv with it, for the agents rows",
    )
    parser.add_argument(
        "--sdk-python",
        type=Path,
        default=os.environ.get("CONVSVC_BENCH_SDK_PYTHON") or None,
        help="python of a venv with openhands-agent-server 1.58.2, for the agent-server rows",
    )
    parser.add_argument(
        "--no-cluster", action="store_true", help="skip the clustered mode (PostgreSQL) section"
    )
    args = parser.parse_args(argv)
    sizes = scenarios.Sizes.quick() if args.quick else scenarios.Sizes.full()
    began = time.monotonic()

    def progress(step: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {step}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    interleaved = scenarios.calls(sizes, progress)
    streams = scenarios.streams(sizes, progress)
    results["floor"] = interleaved["floor"] | streams["floor"]
    results["send"] = interleaved["send"]
    results["catch_up"] = streams["catch_up"]
    results["rounds"] = {"calls": interleaved["rounds"], "streams": streams["rounds"]}
    results["disk_sync"] = scenarios.disk_sync(sizes, progress)
    results["fan_out"] = scenarios.fan_out(sizes, progress)
    results["scale"] = scenarios.scale(sizes, progress)
    results["search"] = search.run(sizes.stored_conversations, sizes.rounds * 10, progress)
    results["durability"] = scenarios.durability(sizes, progress)
    results["adapter"] = scenarios.adapter(sizes, progress, args.openhands_python)
    results["worker_relay"] = scenarios.worker_relay(sizes, progress)
    releases = dict(entry.split("=", 1) for entry in args.agents)
    results["agents"] = scenarios.agents(sizes, progress, {v: Path(p) for v, p in releases.items()})
    results["agent_server"] = scenarios.agent_server(sizes, progress, args.sdk_python)
    if not args.no_cluster:
        results["cluster"] = cluster.run(args.quick, progress)
    checked = report.goals(results)
    print(report.table(results, checked))
    json_path, png_path = report.write(results, checked, args.out)
    progress(f"wrote {json_path} and {png_path}")
    return 0
