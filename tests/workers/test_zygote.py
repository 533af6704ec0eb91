"""The zygote forks conversation processes that share its pages: what it imported is frozen
out of the collector's reach (a collection would copy every page it touches), and each child
collects its own garbage as usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Runs the zygote in a process of its own, with the child's entry point replaced by a probe
# that reports the collector's state as the child sees it.
PROBE = textwrap.dedent(
    """
    import gc, json, os, sys
    from convworker import child, zygote

    def report(socket_path, token):
        frozen = gc.get_freeze_count()
        os.write(int(sys.argv[2]), json.dumps(
            {"token": token, "frozen": frozen, "collecting": gc.isenabled()}
        ).encode() + b"\\n")
        os._exit(0)

    child.run = report
    read_end, write_end = os.pipe()
    os.environ[zygote.READY_FD_VARIABLE] = str(write_end)
    zygote.main(sys.argv[1], ["worker-echo"])
    """
)


def test_children_start_with_the_zygotes_objects_frozen_and_collect_their_own(
    tmp_path: Path,
) -> None:
    read_end, write_end = os.pipe()
    zygote = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(tmp_path / "unused.sock"), str(write_end)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    _, errors = zygote.communicate(b'{"token": "t1"}\n{"token": "t2"}\n', timeout=60)
    assert zygote.returncode == 0, errors.decode()
    # End of file once the zygote and both children have closed the pipe: every report is in.
    with os.fdopen(read_end, "rb") as reports:
        children = [json.loads(line) for line in reports.read().splitlines()]
    assert sorted(c["token"] for c in children) == ["t1", "t2"]
    for seen in children:
        # Thousands of objects (the interpreter, convworker and the kind's modules).
        assert seen["frozen"] > 1_000
        assert seen["collecting"] is True
