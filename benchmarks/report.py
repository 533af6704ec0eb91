"""The run's results: goals checked as ratios to the floor (or counts), a terminal table, a
JSON file with every figure and a PNG chart of the ratios."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float
    target: float
    higher_is_better: bool
    unit: str
    against: str = ""
    """The floor or peer the figure is measured against, as measured in the same run."""

    @property
    def headroom(self) -> float:
        """Measured against the target: 1.0 or more means the goal is met."""
        if self.higher_is_better:
            return self.measured / self.target
        return self.target / self.measured if self.measured else float("inf")

    @property
    def met(self) -> bool:
        return self.headroom >= 1.0


def _median_ratio(rounds: list[dict[str, Any]], ours: str, base: str, figure: str) -> float:
    """The median over the interleaved rounds of each round's ratio."""
    return float(statistics.median(r[ours][figure] / r[base][figure] for r in rounds))


def _rate_of(tenths: list[float]) -> float:
    """The rate over consecutive tenths (each the same number of calls)."""
    return len(tenths) / sum(1 / rate for rate in tenths)


def goals(results: dict[str, Any]) -> list[Goal]:
    floor, rounds = results["floor"], results["rounds"]
    calls, streams = rounds["calls"], rounds["streams"]
    found = [
        Goal(
            f"send, {n} in flight / durable floor",
            _median_ratio(calls, f"send_{n}", f"durable_{n}", "calls_per_s"),
            0.9,
            True,
            "x",
            f"durable floor {floor[f'durable_{n}']['calls_per_s']:,.0f} calls/s",
        )
        for n in (1, 16)
    ]
    found += [
        Goal(
            "round trip p50 / durable call p50",
            _median_ratio(calls, "round_trip", "durable_1", "p50_ms"),
            1.3,
            False,
            "x",
            f"durable call p50 {floor['durable_1']['p50_ms']:.3f} ms",
        ),
        Goal(
            "catch-up / batched stream floor",
            statistics.median(
                r["catch_up"]["events_per_s"] / r["stream_batched"]["items_per_s"] for r in streams
            ),
            0.5,
            True,
            "x",
            f"batched stream floor {floor['stream_batched']['items_per_s']:,.0f} items/s",
        ),
        Goal("fan-out", results["fan_out"]["deliveries_per_s"], 20_000, True, "deliveries/s"),
        Goal(
            "memory per running echo conversation",
            results["scale"]["kib_per_conversation"],
            20.0,
            False,
            "KiB",
        ),
        Goal(
            f"search: slowest query's page p50 at {results['search']['stored']:,} stored",
            results["search"]["worst_p50_ms"],
            20.0,
            False,
            "ms",
        ),
    ]
    cluster = results.get("cluster")
    if cluster:
        owner = cluster["client_send_16"]["owner"]["calls_per_s"]
        tenths = cluster["scale"]["cluster"]["starts_per_s_by_tenth"]
        found += [
            Goal(
                "cluster: routing client's send / to the owner, 16 in flight",
                cluster["ratios"]["routing_client_16"],
                0.9,
                True,
                "x",
                f"to the owner {owner:,.0f} calls/s",
            ),
            Goal(
                f"cluster: starts 0 -> {cluster['scale']['cluster']['running']:,} running, "
                "second half's rate / first half's",
                _rate_of(tenths[5:]) / _rate_of(tenths[:5]),
                0.9,
                True,
                "x",
                f"first half {_rate_of(tenths[:5]):,.0f} starts/s",
            ),
            Goal("takeover after kill -9 (p50)", cluster["takeover"]["p50_s"], 1.0, False, "s"),
            Goal("takeover after kill -9 (p99)", cluster["takeover"]["p99_s"], 2.0, False, "s"),
            Goal(
                "a user's list page at scale (SQLite node)",
                cluster["scale"]["sqlite"]["user_list_p50_ms_at_scale"],
                20.0,
                False,
                "ms",
            ),
            Goal(
                "a user's list page at scale (cluster)",
                cluster["scale"]["cluster"]["user_list_p50_ms_at_scale"],
                20.0,
                False,
                "ms",
            ),
        ]
    found += agent_goals(results["agents"])
    found += agent_server_goals(results.get("agent_server", {"status": "not measured"}))
    return found


def agent_server_goals(measured: dict[str, Any]) -> list[Goal]:
    """OpenHands 1.x: convsvc's agent-server API against a stock agent-server, beside it."""
    if "status" in measured:
        return []
    stock, ours = measured["stock"], measured["convsvc"]
    found = [
        Goal(
            f"agent-server API: {label}, convsvc / stock",
            ours[figure]["p50_ms"] / stock[figure]["p50_ms"],
            1.1,
            False,
            "x",
            f"stock p50 {stock[figure]['p50_ms']:,.0f} ms",
        )
        for label, figure in (
            ("create -> first event", "first_event"),
            ("tiny task -> finish", "task"),
            ("follow-up message", "follow_up"),
        )
    ]
    memory = measured["memory"]
    found.append(
        Goal(
            "agent-server API: memory per running conversation (convsvc)",
            memory["convsvc_growth_per_conversation_mib"],
            memory["stock_server_per_conversation_mib"],
            False,
            "MiB",
            "the goal: less than one stock agent-server per conversation",
        )
    )
    return found


def agent_goals(agents: dict[str, Any]) -> list[Goal]:
    """The goals for real OpenHands agents, per release: convsvc's figures against OpenHands'
    own web server and manager, measured beside them."""
    found: list[Goal] = []
    for version, measured in agents.items():
        if not isinstance(measured, dict):
            continue  # "status": not measured
        own, remote = measured["own"], measured["remote"]
        found += [
            Goal(
                f"OpenHands {version}: {label}, convsvc / OpenHands' own",
                measured[f"{figure}_ratio"],
                target,
                False,
                "x",
                f"own p50 {own[figure]['p50_ms']:,.0f} ms",
            )
            for label, figure, target in (
                ("first task", "task", 1.0),
                ("follow-up message", "follow_up", 1.1),
                ("start -> first agent event", "first_event", 2.0),
            )
        ]
        found.append(
            Goal(
                f"OpenHands {version}: memory per running conversation (PSS growth)",
                remote["memory"]["pss_mib_per_conversation"],
                25.0,
                False,
                "MiB",
                f"own {own['memory']['pss_mib_per_conversation']:.1f} MiB",
            )
        )
    return found


def _search_row(search: dict[str, Any]) -> str:
    pages = "; ".join(
        f"{name} {figures['p50_ms']:.1f} ms" for name, figures in search["pages"].items()
    )
    return f"| search | {search['stored']:,} stored conversations, page p50: {pages} |"


def table(results: dict[str, Any], checked: list[Goal]) -> str:
    floor, send = results["floor"], results["send"]
    lines = [
        "| measurement | value |",
        "| --- | --- |",
        f"| floor: empty call, 1 in flight | {floor['unary_1']['calls_per_s']:,.0f} calls/s, "
        f"p50 {floor['unary_1']['p50_ms']:.3f} ms, p99 {floor['unary_1']['p99_ms']:.3f} ms |",
        f"| floor: empty call, 16 in flight | {floor['unary_16']['calls_per_s']:,.0f} calls/s, "
        f"p50 {floor['unary_16']['p50_ms']:.3f} ms, p99 {floor['unary_16']['p99_ms']:.3f} ms |",
        f"| floor: durable call (answered after a group-committed fsync), 1 in flight | "
        f"{floor['durable_1']['calls_per_s']:,.0f} calls/s, p50 {floor['durable_1']['p50_ms']:.3f}"
        f" ms, p99 {floor['durable_1']['p99_ms']:.3f} ms |",
        f"| floor: durable call, 16 in flight | {floor['durable_16']['calls_per_s']:,.0f} calls/s,"
        f" p50 {floor['durable_16']['p50_ms']:.3f} ms, "
        f"p99 {floor['durable_16']['p99_ms']:.3f} ms |",
        f"| floor: stream, unbatched | {floor['stream_unbatched']['items_per_s']:,.0f} items/s |",
        f"| floor: stream, 100 per message | "
        f"{floor['stream_batched']['items_per_s']:,.0f} items/s |",
        f"| send, 1 in flight | {send['send_1']['calls_per_s']:,.0f} calls/s, "
        f"p50 {send['send_1']['p50_ms']:.3f} ms, p99 {send['send_1']['p99_ms']:.3f} ms |",
        f"| send, 16 in flight | {send['send_16']['calls_per_s']:,.0f} calls/s, "
        f"p50 {send['send_16']['p50_ms']:.3f} ms, p99 {send['send_16']['p99_ms']:.3f} ms |",
        f"| round trip (message -> echo), SendEvent + StreamEvents | "
        f"p50 {send['round_trip']['p50_ms']:.3f} ms, "
        f"p99 {send['round_trip']['p99_ms']:.3f} ms |",
        *_connect_rows(send),
        f"| against the durable floor | send {_ratio(send, floor, 'send_1', 'durable_1')} x at 1"
        f" in flight, {_ratio(send, floor, 'send_16', 'durable_16')} x at 16; round trip p50 "
        f"{send['round_trip']['p50_ms'] / floor['durable_1']['p50_ms']:.2f} x the durable call's |",
        *_disk_sync_rows(results),
        f"| catch-up | {results['catch_up']['events']:,} events at "
        f"{results['catch_up']['events_per_s']:,.0f} events/s |",
        f"| fan-out | {results['fan_out']['subscribers']:,} subscribers: "
        f"{results['fan_out']['deliveries_per_s']:,.0f} deliveries/s, "
        f"p99 delay {results['fan_out']['p99_delay_ms']:.1f} ms |",
        f"| scale | {results['scale']['conversations']:,} conversations: "
        f"{results['scale']['starts_per_s']:,.0f} starts/s, "
        f"{results['scale']['kib_per_conversation']:.1f} KiB each, full list p50 "
        f"{results['scale']['full_list_p50_ms']:.1f} ms, page of 1000 p50 "
        f"{results['scale']['page_p50_ms']:.1f} ms |",
        _search_row(results["search"]),
        f"| durability | group commit {results['durability']['group_commit_appends_per_s']:,.0f} "
        f"appends/s vs one commit per event "
        f"{results['durability']['commit_per_event_appends_per_s']:,.0f}: "
        f"{results['durability']['ratio']:.1f}x |",
        _adapter_row(results["adapter"]),
        f"| worker relay | {results['worker_relay']['events_per_s']:,.0f} events/s from a "
        f"worker emitting as fast as it can, vs catch-up "
        f"{results['catch_up']['events_per_s']:,.0f} events/s |",
        *agents_rows(results["agents"]),
        *agent_server_rows(results.get("agent_server", {"status": "not measured"})),
        *_cluster_rows(results.get("cluster")),
        "",
        "| goal | measured | target | against (same run) | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for goal in checked:
        sign = ">=" if goal.higher_is_better else "<="
        lines.append(
            f"| {goal.name} | {goal.measured:,.2f} {goal.unit} | {sign} {goal.target:,} "
            f"{goal.unit} | {goal.against} | {'yes' if goal.met else 'NO'} |"
        )
    return "\n".join(lines)


def _connect_rows(send: dict[str, Any]) -> list[str]:
    if "connect_round_trip" not in send:  # results from before Connect existed
        return []
    trip = send["connect_round_trip"]
    return [
        f"| round trip over one Connect stream | p50 {trip['p50_ms']:.3f} ms, "
        f"p99 {trip['p99_ms']:.3f} ms ({trip['p50_ms'] / send['round_trip']['p50_ms']:.2f} x "
        "the unary send and stream's p50) |"
    ]


def _ratio(send: dict[str, Any], floor: dict[str, Any], ours: str, base: str) -> str:
    return f"{send[ours]['calls_per_s'] / floor[base]['calls_per_s']:.2f}"


def _disk_sync_rows(results: dict[str, Any]) -> list[str]:
    floor, sync = results["floor"], results["disk_sync"]
    fsync_ms = sync["fsync"]["p50_ms"]
    # A durable answer waits for at least one fsync after the request arrives.
    bound = floor["unary_1"]["p50_ms"] / (floor["unary_1"]["p50_ms"] + fsync_ms)
    one, sixteen, trip = sync["normal_send_1"], sync["normal_send_16"], sync["normal_round_trip"]
    return [
        f"| disk: fsync of a 4 KiB append | p50 {fsync_ms:.3f} ms, p99 "
        f"{sync['fsync']['p99_ms']:.3f} ms: a durable send at 1 in flight can reach at most "
        f"{bound:.2f} x the empty-call rate |",
        f"| send without fsync (synchronous=NORMAL) | 1 in flight "
        f"{one['calls_per_s']:,.0f} calls/s (p50 {one['p50_ms']:.3f} ms), 16 in flight "
        f"{sixteen['calls_per_s']:,.0f} calls/s, round trip p50 {trip['p50_ms']:.3f} ms |",
    ]


def _adapter_row(adapter: dict[str, Any]) -> str:
    if "remote_manager" not in adapter:
        return f"| adapter | {adapter['status']} |"
    remote, local = adapter["remote_manager"], adapter["in_process"]
    return (
        f"| adapter: message -> relayed oh_event | RemoteConversationManager p50 "
        f"{remote['p50_ms']:.3f} ms ({remote['messages_per_s']:,.0f}/s) vs the engine "
        f"in-process p50 {local['p50_ms']:.3f} ms ({local['messages_per_s']:,.0f}/s): "
        f"{adapter['p50_ratio']:.1f}x the latency |"
    )


def agent_server_rows(measured: dict[str, Any]) -> list[str]:
    if "status" in measured:
        return [f"| agent-server API (OpenHands 1.x) | {measured['status']} |"]
    stock, ours = measured["stock"], measured["convsvc"]
    rows = [
        f"| agent-server API: {label} | convsvc p50 {ours[figure]['p50_ms']:,.0f} ms vs stock "
        f"{stock[figure]['p50_ms']:,.0f} ms |"
        for label, figure in (
            ("create -> first event", "first_event"),
            ("tiny task -> finish", "task"),
            ("follow-up message -> run() returns", "follow_up"),
        )
    ]
    memory = measured["memory"]
    machine = memory["conversations_per_machine"]
    rows.append(
        f"| agent-server API: memory per running conversation | convsvc "
        f"{memory['convsvc_growth_per_conversation_mib']:.1f} MiB; stock: one agent-server "
        f"with one conversation {memory['stock_server_per_conversation_mib']:.0f} MiB (growth "
        f"inside one server {memory['stock_growth_per_conversation_mib']:.1f} MiB); on this "
        f"machine's {memory['mem_available_mib']:,.0f} MiB available: {machine['convsvc']:,} "
        f"conversations vs {machine['stock_one_server_each']:,} agent-servers |"
    )
    return rows


def agents_rows(agents: dict[str, Any]) -> list[str]:
    if "status" in agents:
        return [f"| OpenHands agents | {agents['status']} |"]
    rows = []
    for version, measured in agents.items():
        own, remote = measured["own"], measured["remote"]
        for label, figure in (
            ("start -> first agent event in the browser", "first_event"),
            ("first task (create -> finished in the browser)", "task"),
            ("follow-up message -> finished", "follow_up"),
        ):
            rows.append(
                f"| OpenHands {version}: {label} | RemoteConversationManager p50 "
                f"{remote[figure]['p50_ms']:,.0f} ms vs its own manager "
                f"{own[figure]['p50_ms']:,.0f} ms: {measured[f'{figure}_ratio']:.2f} x |"
            )
        parts = ("inbound", "agent", "outbound")
        split = {
            side: ", ".join(
                f"{part} {data['follow_up_breakdown_p50_ms'][part]:.0f} ms" for part in parts
            )
            for side, data in (("remote", remote), ("own", own))
        }
        rows.append(
            f"| OpenHands {version}: where a follow-up's time goes (p50) | convsvc: "
            f"{split['remote']}; own: {split['own']} |"
        )
        memory = remote["memory"]
        rows.append(
            f"| OpenHands {version}: memory per running conversation | convsvc "
            f"{memory['pss_mib_per_conversation']:.1f} MiB (each conversation process "
            f"{_mean(memory['private_mib_each']):.1f} MiB private) vs its own manager "
            f"{own['memory']['pss_mib_per_conversation']:.1f} MiB |"
        )
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cluster_rows(cluster: dict[str, Any] | None) -> list[str]:
    if not cluster:
        return []
    floor, ratios = cluster["postgres_floor"], cluster["ratios"]
    aggregate, takeover = cluster["aggregate"], cluster["takeover"]
    rows = [
        f"| cluster: PostgreSQL floor (bare asyncpg, fenced append) | "
        f"{floor['appends_per_s_1']:,.0f} commits/s on 1 connection, "
        f"{floor['appends_per_s_16']:,.0f} on 16, "
        f"{floor['events_per_s_64_per_commit']:,.0f} events/s at 64 per commit |",
        f"| cluster: send through the owner / floor | {ratios['send_owner_1']:.2f} x at 1 in "
        f"flight ({cluster['send_owner_1']['calls_per_s']:,.0f}/s), "
        f"{ratios['send_owner_16']:.2f} x at 16 "
        f"({cluster['send_owner_16']['calls_per_s']:,.0f}/s) |",
        f"| cluster: send through another node (forwarded) / floor | "
        f"{ratios['send_forwarded_1']:.2f} x at 1 in flight "
        f"({cluster['send_forwarded_1']['calls_per_s']:,.0f}/s), "
        f"{ratios['send_forwarded_16']:.2f} x at 16 "
        f"({cluster['send_forwarded_16']['calls_per_s']:,.0f}/s) |",
        f"| cluster: convclient send, 16 in flight | to the owner "
        f"{cluster['client_send_16']['owner']['calls_per_s']:,.0f}/s, through another node with "
        f"routing {cluster['client_send_16']['routing']['calls_per_s']:,.0f}/s: "
        f"{ratios['routing_client_16']:.2f} x |",
        f"| cluster: round trip p50 / empty-call p50 | through the owner "
        f"{ratios['round_trip_owner_p50']:.1f} x ({cluster['round_trip_owner']['p50_ms']:.2f} ms), "
        f"through another node {ratios['round_trip_forwarded_p50']:.1f} x "
        f"({cluster['round_trip_forwarded']['p50_ms']:.2f} ms) |",
        f"| cluster: aggregate send, 16 in flight per node | 1 SQLite node "
        f"{aggregate['sqlite_1_node']:,.0f}/s; PostgreSQL 1 node "
        f"{aggregate['postgres_1_nodes']:,.0f}/s, 2 nodes {aggregate['postgres_2_nodes']:,.0f}/s,"
        f" 3 nodes {aggregate['postgres_3_nodes']:,.0f}/s |",
        f"| cluster: takeover after kill -9 ({takeover['kills']} kills, lease TTL "
        f"{takeover['lease_ttl_seconds']:.0f} s) | p50 {takeover['p50_s']:.2f} s, p99 "
        f"{takeover['p99_s']:.2f} s, max "
        f"{takeover['max_s']:.2f} s; {takeover['lost']} of {takeover['acknowledged']} "
        f"acknowledged events lost |",
    ]
    for label, key in (("one SQLite node", "sqlite"), ("3 nodes on PostgreSQL", "cluster")):
        scale = cluster["scale"][key]
        rows.append(
            f"| cluster scale: {label} | {scale['stored']:,} stored, {scale['running']:,} "
            f"running: {scale['starts_per_s']:,.0f} starts/s, {scale['kib_per_loop']:.1f} KiB "
            f"per loop, a user's list page p50 {scale['user_list_p50_ms_small']:.1f} ms "
            f"before, {scale['user_list_p50_ms_at_scale']:.1f} ms at scale; starts/s by "
            f"tenth: {', '.join(f'{rate:,.0f}' for rate in scale['starts_per_s_by_tenth'])} |"
        )
    return rows


def write(results: dict[str, Any], checked: list[Goal], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "benchmarks.json"
    document = {**results, "goals": [{**asdict(g), "met": g.met} for g in checked]}
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    png_path = out / "benchmarks.png"
    _chart(checked, png_path)
    return json_path, png_path


def _chart(checked: list[Goal], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    names = [goal.name for goal in checked]
    values = [goal.headroom for goal in checked]
    colors = ["tab:green" if goal.met else "tab:red" for goal in checked]
    axes.barh(names, values, color=colors)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("measured against goal (>= 1 is met; log scale)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
