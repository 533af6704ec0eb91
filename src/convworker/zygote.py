"""The zygote: imports the agent code once, then forks a conversation process per request.

OpenHands takes about ten seconds to import; a fork of a process that imported it and started
no thread is safe and takes milliseconds. Requests arrive on stdin, one JSON object per line
({"token": ...}); the child connects back to the worker's socket with that token. The zygote
exits when its stdin closes (its worker is gone).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from convworker import child
from convworker.kinds import preload

READY_FD_VARIABLE = "CONVWORKER_READY_FD"


def main(socket_path: str, kinds: list[str]) -> None:
    # A forked child shares the zygote's pages until it writes to them. The collector is the
    # big writer (each collection touches every tracked object's header: 126 MiB copied per
    # OpenHands conversation by one full collection, measured), so what the zygote holds is
    # frozen out of its reach; with the collector off while importing, fewer freed holes are
    # left in shared pages for the children to allocate into.
    gc.disable()
    for kind in kinds:
        preload(kind)
    gc.freeze()
    ready = os.fdopen(int(os.environ.pop(READY_FD_VARIABLE)), "w")
    ready.write("ready\n")  # the worker attaches only now: its first fork is fast
    ready.close()
    # Children are reaped by the kernel; each child restores the default for its own use.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork() == 0:
            gc.enable()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            sys.stdin.close()
            os.setsid()  # its own process group: the runtime's commands die with it
            child.run(socket_path, request["token"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
