"""convworker: an agent worker for convsvc.

It attaches to convsvc over the worker protocol (``convsvc.v1.AgentWorkerService``) and runs
each assigned conversation in its own process, forked from a zygote that imported the agent's
code once. Modules: ``attach`` (the stream to convsvc), ``processes`` (the zygote and the
conversation processes), ``child`` (what runs inside a conversation process), ``kinds`` (the
agent loops: ``worker-echo`` and ``openhands``).
"""
