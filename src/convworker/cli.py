"""``convworker``: runs an agent worker until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from convclient.config import ClientSettings
from convworker.attach import Worker
from convworker.kinds import RUNNERS
from convworker.settings import WorkerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convworker",
        description="An agent worker: attaches to convsvc and runs the conversations it "
        "assigns. Flags override CONVSVC_WORKER_* variables; the address, token and TLS "
        "are the client's CONVSVC_* settings.",
    )
    parser.add_argument("--address", help="convsvc's host:port (CONVSVC_ADDRESS)")
    parser.add_argument("--worker-id", help="unique id of this worker")
    parser.add_argument(
        "--kind", action="append", choices=sorted(RUNNERS), help="agent kind to run (repeat)"
    )
    parser.add_argument("--capacity", type=int, help="conversations run at once")
    parser.add_argument("--workspace-root", help="directory of the conversations' workspaces")
    parser.add_argument("--runtime", help="OpenHands runtime: cli (default) or docker")
    parser.add_argument(
        "--allow-client-workspace",
        action="store_true",
        help="openhands-sdk: work in the directory the client names",
    )
    parser.add_argument(
        "--no-fork",
        action="store_true",
        help="start a new interpreter per conversation instead of forking a zygote",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.worker_id:
        overrides["worker_id"] = args.worker_id
    if args.kind:
        overrides["kinds"] = tuple(args.kind)
    if args.capacity:
        overrides["capacity"] = args.capacity
    if args.workspace_root:
        overrides["workspace_root"] = args.workspace_root
    if args.runtime:
        overrides["openhands_runtime"] = args.runtime
    if args.allow_client_workspace:
        overrides["allow_client_workspace"] = True
    if args.no_fork:
        overrides["fork"] = False
    settings = WorkerSettings(**overrides)
    client = ClientSettings(**({"address": args.address} if args.address else {}))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_run(settings, client))


async def _run(settings: WorkerSettings, client: ClientSettings) -> None:
    task = asyncio.create_task(Worker(settings, client).run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return  # SIGTERM or SIGINT
    except RuntimeError as exc:
        logging.getLogger("convworker").error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
