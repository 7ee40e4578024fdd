"""Drain an app on SIGTERM: every ingress replica stops admitting, live streams finish, then Serve stops.

The process that called :func:`~llmstack.serve.deploy` (or ``deploy_canary``, ``deploy_regions``: every app's
ingress is :func:`~llmstack.serve.deployments.ingress.ingress_api`'s) owns one :class:`DrainBoard` actor per app
(named after it). Each ingress replica follows the board (:func:`follow_drain`): a long-poll that returns when the
drain starts, so all replicas, however many, start draining at once without polling. Each replica reports
back once it has no live request (or its grace period ended); the deploying process then deletes the app.

The order on SIGTERM (also Ctrl-C) to a deploying process, :func:`drain_and_exit`:

1. the board starts the drain: new requests get 503 + Retry-After (OpenAI shape), /health answers 503;
2. live requests finish, for at most ``graceful_shutdown_timeout_s``; streams still running then get an SSE
   error event and ``[DONE]``;
3. the app is deleted, Ray is shut down (the local cluster too when this process started it), and the
   process exits with status 0: a stop that was asked for and carried out is a success (documented in
   ``llmstack deploy --help``; a second SIGTERM during the drain is ignored).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any

logger = logging.getLogger("ray.serve")  # in a replica: its Serve log

BOARD_NAMESPACE = "llmstack"
IDLE_MARGIN_S = 2.0  # past the deadline, how long the deploying process waits for replicas' reports


def board_name(app_name: str) -> str:
    return f"llmstack-drain:{app_name}"


class DrainBoard:
    """The drain signal of one app (a Ray actor owned by the deploying process; it dies with it)."""

    def __init__(self) -> None:
        self._started = asyncio.Event()
        self._deadline = 0.0  # time.time() at which the grace period ends
        self._idle: set[str] = set()

    async def start(self, grace_s: float) -> None:
        if not self._started.is_set():
            self._deadline = time.time() + grace_s
            self._started.set()

    async def wait_started(self) -> float:
        """Returns, once the drain starts, the seconds left of the grace period."""
        await self._started.wait()
        return max(0.0, self._deadline - time.time())

    async def report_idle(self, replica: str) -> int:
        self._idle.add(replica)
        return len(self._idle)

    async def idle_replicas(self) -> int:
        return len(self._idle)


def create_board(app_name: str) -> Any:
    """The app's board actor (the existing one when the app is replaced)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=10_000)(DrainBoard)
    return actor.options(name=board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True).remote()


async def follow_drain(board: Any, drain: Any, replica: str) -> None:
    """Run on an ingress replica's event loop: start ``drain`` (a :class:`~llmstack.serve.http.drain.Drain`)
    when ``board`` (the app's :class:`DrainBoard`) says so, and report back once no request is live."""
    import ray

    try:
        grace_s = await board.wait_started.remote()
        logger.info("draining: new requests get 503, live ones have %.1f s", grace_s)
        drain.start(grace_s)
        await drain.wait_idle(grace_s + 1.0)  # at the deadline the last streams end at once
        await board.report_idle.remote(replica)
    except ray.exceptions.RayActorError:  # the deploying process is gone: nothing to report to
        return
    except Exception:
        logger.exception("following the drain board failed")


def start_following(board: Any, drain: Any, replica: str) -> None:
    """:func:`follow_drain` as a task of the running loop (the replica's user-code loop). ``board`` None: the
    app was not started by :func:`~llmstack.serve.deploy` (``serve run``), whose shutdown is Serve's own."""
    if board is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        logger.warning("no running event loop: ingress %s will not drain on SIGTERM", replica)
        return
    task = loop.create_task(follow_drain(board, drain, replica))
    _FOLLOWERS.add(task)
    task.add_done_callback(_FOLLOWERS.discard)


_FOLLOWERS: set[asyncio.Task] = set()  # strong references: a pending task is not garbage-collected


def drain_apps(deployments: list[Any], *, delete: bool = True) -> None:
    """Drain every deployment at once (each with its config's ``graceful_shutdown_timeout_s``), then delete
    them (unless not ``delete``: the caller ends the cluster). A deployment whose replicas do not all report
    idle is deleted at its deadline plus a margin."""
    import ray

    started = []
    for dep in deployments:
        if dep.board is None:
            continue
        grace_s = dep.config.deployment["graceful_shutdown_timeout_s"]
        try:
            ray.get(dep.board.start.remote(grace_s), timeout=10)
        except Exception as exc:  # noqa: BLE001 - the board is gone: delete without draining
            logger.warning("could not start the drain of %r: %s", dep.app_name, exc)
            continue
        started.append((dep, time.monotonic() + grace_s + IDLE_MARGIN_S))
    for dep, give_up_at in started:
        while time.monotonic() < give_up_at:
            try:
                if ray.get(dep.board.idle_replicas.remote(), timeout=5) >= dep.ingress_replicas:
                    break
            except Exception:  # noqa: BLE001 - board gone: stop waiting
                break
            time.sleep(0.1)
    for dep in deployments:
        if delete:
            dep.shutdown()
        else:
            forget(dep)


_LIVE: list[Any] = []  # deployments this process started and has not shut down
_draining = threading.Event()


def register(deployment: Any) -> None:
    """Drain ``deployment`` on SIGTERM to this process (the handler is installed once, from the main thread)."""
    _LIVE.append(deployment)
    if threading.current_thread() is threading.main_thread():  # after ray.init, which sets its own handler
        signal.signal(signal.SIGTERM, _on_sigterm)


def forget(deployment: Any) -> None:
    if deployment in _LIVE:
        _LIVE.remove(deployment)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _draining.is_set():  # a second SIGTERM while draining: the drain goes on
        return
    drain_and_exit()


def drain_and_exit(status: int = 0) -> None:
    """Drain every live deployment of this process, shut Ray down and exit with ``status`` (SystemExit).

    When this process started the cluster, the drained apps are not deleted first: the cluster ends with
    them, and until it has, their ingress answers 503 + Retry-After (a deleted app's route would answer 404)."""
    import ray

    from llmstack._ray import started_here

    _draining.set()
    drain_apps(list(_LIVE), delete=not started_here())
    if ray.is_initialized():
        ray.shutdown()
    raise SystemExit(status)
