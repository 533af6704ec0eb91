"""The agents benchmark (benchmarks/agents_web.py) at its smallest, in this OpenHands release:
OpenHands' own web server and manager against RemoteConversationManager with a worker, both
driven by a socket.io browser, each figure measured and its goal computed."""

from __future__ import annotations

import math

import pytest

from benchmarks import agents_web, report
from tests.openhands.conftest import Convsvc


@pytest.mark.timeout(300)  # two OpenHands web servers and a worker start: about a minute
async def test_the_agents_benchmark_measures_both_managers(agent_convsvc: Convsvc) -> None:
    assert agent_convsvc.process is not None
    measured = await agents_web.measure(agent_convsvc.address, agent_convsvc.process.pid, 1)

    for side in ("own", "remote"):
        for figure in ("first_event", "task", "follow_up"):
            assert measured[side][figure]["p50_ms"] > 0, (side, figure)
        breakdown = measured[side]["follow_up_breakdown_p50_ms"]
        # The three parts are consecutive stretches of the same follow-up.
        assert all(part >= 0 for part in breakdown.values()), (side, breakdown)
        assert sum(breakdown.values()) <= measured[side]["follow_up"]["p50_ms"] * 1.01
    memory = measured["remote"]["memory"]
    assert memory["conversation_processes"] == agents_web.RUNNING
    assert all(private > 0 for private in memory["private_mib_each"])
    # A conversation process costs what it does not share with the zygote, far from the whole
    # interpreter with OpenHands in it (hundreds of MiB).
    assert memory["pss_mib_per_conversation"] < 100

    goals = report.agent_goals({"this release": measured})
    assert len(goals) == 4
    assert all(math.isfinite(goal.measured) and goal.measured > 0 for goal in goals)
    assert all(goal.against for goal in goals)
    assert any("follow-up" in row for row in report.agents_rows({"this release": measured}))
