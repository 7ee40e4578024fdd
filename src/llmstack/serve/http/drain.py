"""Graceful drain of one ingress: refuse new work, let live requests finish, end the rest at a deadline.

A :class:`Drain` lives on each app built by :func:`~llmstack.serve.http.make_api` (``app.state.drain``).
Once :meth:`Drain.start` is called (SIGTERM to the process that deployed the app, through
:mod:`llmstack.serve.deployments.drain`):

- new requests get ``503`` + ``Retry-After`` in the OpenAI error shape (``code: "shutting_down"``), and
  ``/health`` answers 503 so a load balancer stops routing here;
- requests already admitted keep running until they finish or the grace period ends;
- at the deadline a stream still running gets an SSE ``error`` event and ``data: [DONE]``; a request that has
  not started answering gets the 503.
"""

from __future__ import annotations

import asyncio
import math
import time

from llmstack.errors import RequestError

SHUTTING_DOWN = "shutting_down"  # the error code of every refusal a drain causes
DEADLINE = object()  # put into a watched stream's queue when the grace period ends


class Drain:
    """Drain state of one ingress: whether it drains, its deadline, and the requests still live."""

    def __init__(self, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        self.draining = False
        self.deadline: float | None = None  # time.monotonic() at which live requests are ended
        self.live = 0  # requests admitted and not yet answered in full
        self.grace_over = False  # the deadline passed: what is still live is ended
        self._idle: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._streams: set[asyncio.Queue] = set()  # event queues of live SSE streams: told at the deadline

    def start(self, grace_s: float) -> None:
        """Stop admitting; live requests get ``grace_s`` seconds. Idempotent (a second call keeps the first
        deadline). Must be called on the event loop that serves the requests."""
        if self.draining:
            return
        self.draining = True
        self.deadline = time.monotonic() + max(0.0, grace_s)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, grace_s), self._end_grace)
        self._update_idle()

    def _end_grace(self) -> None:
        self.grace_over = True
        for queue in list(self._streams):
            queue.put_nowait(DEADLINE)

    def watch(self, queue: asyncio.Queue) -> None:
        """Put :data:`DEADLINE` into ``queue`` (a stream's event queue) when the grace period ends."""
        if self.grace_over:
            queue.put_nowait(DEADLINE)
        self._streams.add(queue)

    def unwatch(self, queue: asyncio.Queue) -> None:
        self._streams.discard(queue)

    def refusal(self) -> RequestError:
        """The 503 of a request that arrives while draining (or is cut before answering at the deadline)."""
        return RequestError("The server is shutting down and accepts no new requests; retry on another replica "
                            "or shortly.", status_code=503, type="service_unavailable", code=SHUTTING_DOWN,
                            headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))})

    def deadline_error(self) -> RequestError:
        """The SSE error event of a stream still running when the grace period ends."""
        return RequestError("The server shut down before this stream finished (its grace period ended); the "
                            "tokens sent so far are valid, retry for the rest.", status_code=503,
                            type="service_unavailable", code=SHUTTING_DOWN)

    def admit(self) -> None:
        """Count one request as live (call :meth:`release` when it is answered in full)."""
        self.live += 1
        self._update_idle()

    def release(self) -> None:
        self.live -= 1
        self._update_idle()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is live (True) or ``timeout_s`` passed (False)."""
        if self._idle is None:
            self._idle = asyncio.Event()
            self._update_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _update_idle(self) -> None:
        if self._idle is not None:
            if self.live <= 0:
                self._idle.set()
            else:
                self._idle.clear()
