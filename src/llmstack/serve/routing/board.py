"""The routing layer's shared state: one small Serve deployment per app, the board, off the request path.

Each ingress replica routes on its own state (a :class:`~llmstack.serve.routing.region_policy.RegionRouter`, the
canary weights it last adopted); the board carries news between replicas and owns what must have one
owner:

* regions: a manual override (``POST /regions/routing``: policy, SLO, weights) is published by the replica
  that got it; every other replica adopts the board's latest one on its next sync (last writer wins); an
  ejection seen by one replica is published and ejects the region on the others at their next sync (each
  re-admits it through its own probes);
* canaries: every canary of the app (its own, or one inside a region) is a
  :class:`~llmstack.serve.routing.rollout.CanaryScope` here. Replicas send what they saw (finished requests,
  requests in flight, shadow comparisons) every :data:`EXCHANGE_S` and get back the weights to route on;
  the board ticks each rollout plan and writes the registry (promote, rollback), never on a request's path.

Why a deployment rather than a broadcast: a Serve handle reaches one replica of its choice, never all of
them, so a replica cannot tell its peers directly. The board is one replica (no CPU) of the app, so it
goes away with the app and Serve restarts it if it dies. Losing it never blocks routing: every call to it
is bounded and made from a background task (or an admin route, which then says so); replicas keep routing
on their local state, and a restarted board gets the survivors' current override republished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")

BOARD = "RoutingBoard"  # the board's deployment name in every app of the routing layer
STALE_S = 10.0  # an ejection older than this (board time) when a replica first reads it is history, not news
KEEP_EVENTS = 200
EXCHANGE_S = 0.1  # how often each replica exchanges canary news with the board
LIVE_S = 1.0  # a replica that exchanged within this long counts when a change must reach every replica
SETTLE_TIMEOUT_S = 3.0  # an admin change waits at most this long for the replicas to adopt it
TICK_S = 0.1  # the rollout plans' control period


class RoutingBoard:
    """The shared state (run as the app's ``RoutingBoard`` deployment): region news and the app's canaries.

    Args:
        spec: the app's resolved routing spec (``serve``, ``canary`` and/or ``regions``); None holds region
            news only (unit tests).
    """

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.routing: dict[str, Any] | None = None
        self.routing_version = 0
        self.events: list[dict[str, Any]] = []
        self.seq = 0
        self.spec = spec or {}
        self.canaries: dict[str, Any] = {}  # scope ("" or a region) -> CanaryScope, built on first use
        self.adopted: dict[str, tuple[float, dict[str, int]]] = {}  # replica -> (last exchange, scope -> epoch)
        self._started: asyncio.Task | None = None
        self._control: asyncio.Task | None = None

    def publish_routing(self, routing: dict[str, Any], replica: str) -> dict[str, Any]:
        self.routing_version += 1
        self.routing = {**routing, "by": replica}
        return {"board": self.id, "routing_version": self.routing_version}

    def publish_health(self, region: str, healthy: bool, replica: str, reason: str) -> int:
        self.seq += 1
        self.events.append({"seq": self.seq, "t": time.monotonic(), "region": region, "healthy": healthy,
                            "replica": replica, "reason": reason})
        del self.events[:-KEEP_EVENTS]
        return self.seq

    def snapshot(self, since: int) -> dict[str, Any]:
        now = time.monotonic()
        return {"board": self.id, "seq": self.seq, "routing_version": self.routing_version,
                "routing": self.routing,
                "events": [{**e, "age_s": now - e["t"]} for e in self.events if e["seq"] > since]}

    # ------------------------------------------------------------------ canaries

    async def _ready(self) -> None:
        """Build the canaries of the spec and start the control loop (once, on the first call)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._build())
        await asyncio.shield(self._started)

    async def _build(self) -> None:
        from llmstack.serve.routing.rollout import CanaryScope

        app_name = _own_app_name(self.spec.get("serve", {}).get("app_name", ""))
        scopes = canary_scopes(self.spec)
        for scope, (data, resource) in scopes.items():
            self.canaries[scope] = CanaryScope(scope, data, serve=self.spec["serve"], app_name=app_name,
                                               settled=self.settled, resource=resource)
        for canary in self.canaries.values():
            await canary.begin()
        if self.canaries:
            self._control = asyncio.get_running_loop().create_task(self._control_loop())

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for canary in list(self.canaries.values()):
                await canary.tick()

    async def exchange(self, replica: str, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A replica's canary news in, every canary's view out (what it routes on until the next exchange)."""
        await self._ready()
        for scope, report in reports.items():
            if scope in self.canaries:
                self.canaries[scope].ingest(replica, report)
        epochs = {scope: int(report.get("epoch", 0)) for scope, report in reports.items()}
        self.adopted[replica] = (time.monotonic(), epochs)
        return {scope: canary.view() for scope, canary in self.canaries.items()}

    async def settled(self, scope: str, epoch: int) -> bool:
        """Wait until every live replica routes on ``epoch`` of ``scope`` (False after SETTLE_TIMEOUT_S)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            now = time.monotonic()
            live = [epochs for seen, epochs in self.adopted.values() if now - seen < LIVE_S]
            if all(epochs.get(scope, 0) >= epoch for epochs in live):
                return True
            if now > deadline:
                return False
            await asyncio.sleep(EXCHANGE_S / 4)

    async def canary(self, scope: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """An admin call on one canary (``scope`` None: the app's only one).

        Raises:
            CanaryError: the app has no canary there (names the ones it has).
        """
        from llmstack.serve.routing.canary_config import CanaryError

        await self._ready()
        if scope is None and len(self.canaries) == 1:
            scope = next(iter(self.canaries))
        if scope not in self.canaries:
            where = ", ".join(repr(s) if s else "the app's own" for s in self.canaries) or "none"
            raise CanaryError(f"no canary {'in region ' + repr(scope) if scope else 'here'} "
                              f"(this app's canaries: {where}); pass the region of one")
        return await getattr(self.canaries[scope], method)(*args, **kwargs)

    async def scopes(self) -> list[str]:
        """The app's canaries ("" for the app's own, else region names)."""
        await self._ready()
        return list(self.canaries)


def _ignore(*args: Any) -> None:
    return None


def _no_board() -> Any:
    raise ConnectionError("no routing board is connected")


class BoardLink:
    """A router replica's side of the board: bounded calls, adopting news, republishing after a board loss.

    Args:
        name: the board's name in logs and status (one per deployed app).
        replica: this replica's id (its own events are not news to it).
        apply_routing: called with a peer's override ``{policy, slo_p95_s, weights}``.
        apply_ejection: called with ``(region, reason)`` for a peer's fresh ejection.
        local_routing: the override this replica routes on now (republished to a new board).
        connect: returns the board's handle (the app's ``RoutingBoard`` deployment; tests pass a fake).
        reports: the canary news to send on each exchange (scope -> report); apply_views: takes the answer.
    """

    def __init__(self, name: str, replica: str, *, apply_routing: Callable[[dict[str, Any]], None] = _ignore,
                 apply_ejection: Callable[[str, str], None] = _ignore,
                 local_routing: Callable[[], dict[str, Any]] = dict, connect: Callable[[], Any] = _no_board,
                 reports: Callable[[], dict[str, Any]] = dict,
                 apply_views: Callable[[dict[str, Any]], None] = _ignore, timeout_s: float = 2.0) -> None:
        self.name, self.replica, self.connect, self.timeout_s = name, replica, connect, timeout_s
        # region news: a peer's override and ejections in, this replica's override out (to a new board)
        self.apply_routing, self.apply_ejection, self.local_routing = apply_routing, apply_ejection, local_routing
        # canary news: this replica's reports out, the canaries' views in
        self.reports, self.apply_views = reports, apply_views
        self.handle: Any = None
        self.board_id: str | None = None
        self.seen_seq = 0
        self.routing_version = 0
        self.overridden = False  # this replica's routing was changed at run time (by it or a peer)
        self.connected = False
        self.last_error: str | None = None

    async def _call(self, method: str, *args: Any) -> Any:
        if self.handle is None:
            self.handle = await asyncio.wait_for(asyncio.to_thread(self.connect), self.timeout_s)
        try:
            result = await asyncio.wait_for(_awaitable(getattr(self.handle, method).remote(*args)), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.handle = None  # look it up afresh next time
            self.connected = False
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            raise
        self.connected = True
        return result

    async def publish_routing(self, routing: dict[str, Any]) -> bool:
        """Share this replica's new override; False if the board did not take it (peers keep theirs)."""
        self.overridden = True
        try:
            answer = await self._call("publish_routing", routing, self.replica)
        except Exception:
            return False
        if answer["board"] == self.board_id:
            self.routing_version = max(self.routing_version, answer["routing_version"])
        return True

    async def publish_ejection(self, region: str, reason: str) -> None:
        try:
            await self._call("publish_health", region, False, self.replica, reason)
        except Exception:
            pass

    async def sync(self) -> None:
        """Adopt the board's news once (raises when the board cannot be reached)."""
        snap = await self._call("snapshot", self.seen_seq)
        if snap["board"] != self.board_id:  # a new board (first contact, or the old one was lost)
            first = self.board_id is None
            self.board_id, self.routing_version = snap["board"], 0
            if not first and self.overridden and snap["routing_version"] == 0:
                await self.publish_routing(self.local_routing())
            self.seen_seq = snap["seq"] if first else 0
            if first:
                snap["events"] = [e for e in snap["events"] if e["age_s"] < STALE_S]
        if snap["routing_version"] > self.routing_version and snap["routing"]:
            self.routing_version = snap["routing_version"]
            if snap["routing"].get("by") != self.replica:
                self.overridden = True
                self.apply_routing({k: v for k, v in snap["routing"].items() if k != "by"})
        for event in snap["events"]:
            self.seen_seq = max(self.seen_seq, event["seq"])
            if event["replica"] != self.replica and not event["healthy"] and event["age_s"] < STALE_S:
                self.apply_ejection(event["region"], f"peer {event['replica']}: {event['reason']}")

    async def run(self, period_s: float) -> None:
        """Sync every ``period_s`` until cancelled; a lost board is retried, never raised."""
        await self._repeat(self.sync, period_s, None, "routing on local state")

    async def exchange(self) -> None:
        """Send the canary news once and adopt the views (raises when the board cannot be reached).

        News that could not be delivered is dropped: the KPIs miss it, routing goes on.
        """
        self.apply_views(await self._call("exchange", self.replica, self.reports()))

    async def run_exchange(self, period_s: float = EXCHANGE_S, wake: asyncio.Event | None = None) -> None:
        """Exchange every ``period_s`` (or as soon as ``wake`` is set) until cancelled; a lost board is retried,
        never raised."""
        await self._repeat(self.exchange, period_s, wake, "routing on the last weights")

    async def _repeat(self, step: Callable[[], Any], period_s: float, wake: asyncio.Event | None,
                      meanwhile: str) -> None:
        while True:
            _raise_if_cancelled()
            if wake is not None:
                wake.clear()
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected or self.last_error is None:
                    logger.warning("routing board %s unreachable (%s); %s", self.name, exc, meanwhile)
                self.connected = False
            if wake is None:
                await asyncio.sleep(period_s)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), period_s)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "connected": self.connected, "routing_version": self.routing_version,
                "last_error": self.last_error}


def _raise_if_cancelled() -> None:
    """Stop a loop whose task was asked to stop: Python 3.11's ``asyncio.wait_for`` drops a cancellation that
    arrives as the awaited call finishes, which left an exchange loop running forever after ``cancel()``."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


async def _awaitable(ref: Any) -> Any:
    return await ref


def board_name(app_name: str, deploy_id: str) -> str:
    return f"routing-board:{app_name}:{deploy_id}"


def canary_scopes(spec: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str | None]]:
    """The canaries of a routing spec: scope ("" for the app's own, else the region) -> (its data, its resource)."""
    scopes: dict[str, tuple[dict[str, Any], str | None]] = {}
    if spec.get("canary"):
        scopes[""] = (spec["canary"], None)
    for name, region in (spec.get("regions") or {}).items():
        if region.get("canary"):
            scopes[name] = (region["canary"], region["resource"])
    return scopes


def _own_app_name(configured: str) -> str:
    """The Serve application this replica belongs to (``serve run`` names it in the YAML, not in the args)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # constructed outside a replica (unit tests)
        return configured



def replica_id() -> str:
    """This ingress replica's Serve id (a random one outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]
