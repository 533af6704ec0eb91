"""The worker's session with convsvc: one Attach stream, kept open and reopened after a
break, relaying between convsvc and the conversation processes.

When the stream breaks, convsvc has already given this worker's conversations to others (or
will once it notices): every conversation process is killed, and the worker attaches again
with nothing assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import grpc

from convclient.channel import call_metadata, channel_options, credentials
from convclient.config import ClientSettings
from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import agent_worker_service_pb2_grpc as wpb_grpc
from convworker.processes import ConversationProcess, ProcessLauncher
from convworker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Loop:
    """An assignment from convsvc and, once started, its process."""

    conversation_id: str
    assignment: int
    assign: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    process: ConversationProcess | None = None
    backlog: list[dict[str, Any]] = field(default_factory=list)
    """Messages for the process that arrived before it connected."""
    stopping: bool = False
    reported: bool = False
    """LoopReleased or LoopFailed was sent: nothing more about this assignment."""

    def send(self, message: dict[str, Any]) -> None:
        if self.process is None:
            self.backlog.append(message)
        else:
            self.process.send(message)


class Worker:
    """Attaches to convsvc and runs what it assigns."""

    def __init__(self, settings: WorkerSettings, client: ClientSettings) -> None:
        self.settings = settings
        self.client = client
        self._launcher = ProcessLauncher(
            settings.kinds, settings.fork, self._from_process, self._process_exited, self._broken
        )
        self._loops: dict[str, _Loop] = {}
        self._out: asyncio.Queue[wpb.AttachRequest | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.attached = asyncio.Event()
        """Set while attached (tests and readiness wait on it)."""
        self._fatal: BaseException | None = None
        self._run_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serves until cancelled, attaching again after every break. Raises when the worker
        can run no conversation any more (its zygote died), so that its supervisor restarts
        it; convsvc gives its conversations to other workers meanwhile."""
        self._run_task = asyncio.current_task()
        self.settings.workspace_root.mkdir(parents=True, exist_ok=True)
        await self._launcher.start()
        delay = 0.1
        try:
            while True:
                try:
                    await self._session()
                    delay = 0.1
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "attach to %s ended: %s %s",
                        self.client.address,
                        exc.code().name,
                        exc.details(),
                    )
                    if exc.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.ALREADY_EXISTS,
                        grpc.StatusCode.UNAUTHENTICATED,
                    ):
                        delay = self.settings.reconnect_max_seconds
                finally:
                    self.attached.clear()
                    await self._abandon_all()
                await asyncio.sleep(delay * (0.5 + random.random()))  # jittered backoff
                delay = min(delay * 2, self.settings.reconnect_max_seconds)
        except asyncio.CancelledError:
            if self._fatal is not None:
                raise self._fatal from None
            raise
        finally:
            await self._abandon_all()
            await self._launcher.stop()

    async def _session(self) -> None:
        creds = credentials(self.client)
        options = channel_options(self.client)
        channel = (
            grpc.aio.secure_channel(self.client.address, creds, options=options)
            if creds is not None
            else grpc.aio.insecure_channel(self.client.address, options=options)
        )
        async with channel:
            self._out = asyncio.Queue()
            self._out.put_nowait(
                wpb.AttachRequest(
                    hello=wpb.WorkerHello(
                        worker_id=self.settings.worker_id,
                        agent_kinds=list(self.settings.kinds),
                        capacity=self.settings.capacity,
                    )
                )
            )
            call = wpb_grpc.AgentWorkerServiceStub(channel).Attach(
                self._requests(), metadata=call_metadata(self.client)
            )
            pinger: asyncio.Task[None] | None = None
            try:
                async for response in call:
                    kind = response.WhichOneof("message")
                    if kind == "welcome":
                        interval = response.welcome.ping_interval.ToTimedelta().total_seconds()
                        pinger = asyncio.create_task(self._ping(interval))
                        self.attached.set()
                        log.info(
                            "attached to %s as %s", self.client.address, self.settings.worker_id
                        )
                    elif kind == "assign":
                        self._assign(response.assign)
                    elif kind == "history":
                        self._history(response.history)
                    elif kind == "deliver":
                        self._deliver(response.deliver)
                    elif kind == "stop":
                        self._stop(response.stop)
                    elif kind == "completion":
                        self._complete(response.completion)
            finally:
                if pinger is not None:
                    pinger.cancel()
                    await asyncio.gather(pinger, return_exceptions=True)
                self._out.put_nowait(None)
                call.cancel()

    async def _requests(self) -> Any:
        out = self._out
        while (message := await out.get()) is not None:
            yield message

    async def _ping(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval / 2)  # liveness is time-based by design
            self._out.put_nowait(wpb.AttachRequest(ping=wpb.WorkerPing()))

    # -- from convsvc ------------------------------------------------------------------------

    def _assign(self, message: wpb.AssignLoop) -> None:
        previous = self._loops.pop(message.conversation_id, None)
        if previous is not None and previous.process is not None:
            previous.process.kill()
        loop = _Loop(
            message.conversation_id,
            message.assignment,
            {
                "conversation_id": message.conversation_id,
                "assignment": message.assignment,
                "agent_kind": message.agent_kind,
                "user_id": message.user_id,
                "settings": struct_to_dict(message.settings),
                "next_event_id": message.next_event_id,
                "initial_user_message": struct_to_dict(message.initial_user_message)
                if message.HasField("initial_user_message")
                else None,
                "replay_events": [struct_to_dict(e) for e in message.replay_events],
                "workspace": str(
                    (self.settings.workspace_root / message.conversation_id).absolute()
                ),
                "worker_options": {
                    "runtime": self.settings.openhands_runtime,
                    "allow_client_workspace": self.settings.allow_client_workspace,
                },
            },
        )
        self._loops[message.conversation_id] = loop
        self._launch_when_complete(loop)

    def _history(self, message: wpb.LoopHistory) -> None:
        loop = self._current(message.conversation_id, message.assignment)
        if loop is None:
            return
        loop.history.extend(struct_to_dict(event.payload) for event in message.events)
        self._launch_when_complete(loop)

    def _deliver(self, message: wpb.DeliverUserEvent) -> None:
        loop = self._current(message.conversation_id, message.assignment)
        if loop is not None:
            loop.send(
                {
                    "type": "deliver",
                    "delivery_id": message.delivery_id,
                    "payload": struct_to_dict(message.payload),
                }
            )

    def _complete(self, message: wpb.CompletionRequest) -> None:
        loop = self._current(message.conversation_id, message.assignment)
        if loop is None:
            return  # the assignment ended: convsvc has already failed the request
        loop.send(
            {
                "type": "complete",
                "request_id": message.request_id,
                "service_id": message.service_id,
                "llm_config": struct_to_dict(message.llm_config),
                "messages": [struct_to_dict(m) for m in message.messages],
            }
        )

    def _stop(self, message: wpb.StopLoop) -> None:
        loop = self._current(message.conversation_id, message.assignment)
        if loop is None:
            self._report(message.conversation_id, message.assignment, released=True)
            return
        loop.stopping = True
        if loop.process is None:
            self._finish(loop, released=True)
            return
        loop.process.send({"type": "stop"})
        process = loop.process
        asyncio.get_running_loop().call_later(self.settings.stop_grace_seconds, process.kill)

    def _current(self, conversation_id: str, assignment: int) -> _Loop | None:
        loop = self._loops.get(conversation_id)
        return loop if loop is not None and loop.assignment == assignment else None

    def _launch_when_complete(self, loop: _Loop) -> None:
        if len(loop.history) < loop.assign["next_event_id"]:
            return
        task = asyncio.create_task(self._launch(loop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, loop: _Loop) -> None:
        try:
            process = await self._launcher.launch(
                loop.conversation_id, {**loop.assign, "history": loop.history}
            )
        except Exception as exc:
            log.exception("conversation %s: its process did not start", loop.conversation_id)
            self._finish(loop, released=False, why=f"the process did not start: {exc}")
            if self._launcher.broken:
                self._broken()
            return
        loop.history = []  # the process has it now
        if self._loops.get(loop.conversation_id) is not loop or loop.reported:
            process.kill()
            return
        loop.process = process
        for message in loop.backlog:
            process.send(message)
        loop.backlog.clear()
        if loop.stopping:
            process.send({"type": "stop"})

    def _broken(self) -> None:
        """No conversation can start here any more: stop, so a supervisor restarts us."""
        if self._fatal is None and self._run_task is not None:
            self._fatal = RuntimeError("the zygote process died; this worker must restart")
            self._run_task.cancel()

    # -- from conversation processes ---------------------------------------------------------

    def _from_process(self, process: ConversationProcess, message: dict[str, Any]) -> None:
        loop = self._loops.get(process.conversation_id)
        if loop is None or loop.process is not process or loop.reported:
            return
        kind = message.get("type")
        if kind == "events":
            self._out.put_nowait(
                wpb.AttachRequest(
                    events=wpb.LoopEvents(
                        conversation_id=loop.conversation_id,
                        assignment=loop.assignment,
                        events=[
                            wpb.WorkerEvent(
                                id=event["id"],
                                source=event["source"],
                                payload=dict_to_struct(event["payload"]),
                                delivery_id=event.get("delivery_id", ""),
                            )
                            for event in message["events"]
                        ],
                    )
                )
            )
        elif kind == "status":
            self._out.put_nowait(
                wpb.AttachRequest(
                    status=wpb.LoopStatus(
                        conversation_id=loop.conversation_id,
                        assignment=loop.assignment,
                        status=dict_to_struct(message["status"]),
                    )
                )
            )
        elif kind == "completion":
            self._out.put_nowait(
                wpb.AttachRequest(
                    completion=wpb.CompletionResult(
                        conversation_id=loop.conversation_id,
                        assignment=loop.assignment,
                        request_id=message["request_id"],
                        content=message.get("content", ""),
                        error=message.get("error", ""),
                    )
                )
            )
        elif kind == "released" and loop.stopping:
            self._finish(loop, released=True)

    def _process_exited(self, process: ConversationProcess) -> None:
        loop = self._loops.get(process.conversation_id)
        if loop is None or loop.process is not process or loop.reported:
            return
        self._finish(
            loop, released=loop.stopping, why="the conversation process exited unexpectedly"
        )

    def _finish(self, loop: _Loop, *, released: bool, why: str = "") -> None:
        loop.reported = True
        if self._loops.get(loop.conversation_id) is loop:
            del self._loops[loop.conversation_id]
        self._report(loop.conversation_id, loop.assignment, released=released, why=why)

    def _report(
        self, conversation_id: str, assignment: int, *, released: bool, why: str = ""
    ) -> None:
        if released:
            message = wpb.AttachRequest(
                released=wpb.LoopReleased(conversation_id=conversation_id, assignment=assignment)
            )
        else:
            message = wpb.AttachRequest(
                failed=wpb.LoopFailed(
                    conversation_id=conversation_id, assignment=assignment, message=why
                )
            )
        self._out.put_nowait(message)

    async def _abandon_all(self) -> None:
        """The session ended: convsvc reassigns everything, so nothing here may go on."""
        for loop in self._loops.values():
            loop.reported = True
            if loop.process is not None:
                loop.process.kill()
        self._loops.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: WorkerSettings, client: ClientSettings) -> None:
    worker = Worker(settings, client)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.run()
