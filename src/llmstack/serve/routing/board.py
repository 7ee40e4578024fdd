"""Health and routing shared by a multi-region app's router replicas: a small named Ray actor, the board.

Each router (ingress) replica keeps its own :class:`~llmstack.serve.regions.policy.RegionRouter` and routes
on it alone; the board only carries news between replicas, off the request path:

* a manual override (``POST /regions/routing``: policy, SLO, weights) is published by the replica that got
  it; every other replica adopts the board's latest one on its next sync (last writer wins);
* an ejection seen by one replica is published and ejects the region on the others at their next sync
  (each re-admits it through its own probes).

Why an actor rather than a broadcast: a Serve handle reaches one replica of its choice, never all of them,
so a replica cannot tell its peers directly. The board is one actor per deployed app (its name carries the
deploy's id, so a redeploy never adopts an old override), created by the first replica that looks for it
(soft affinity to that replica's node, no CPU) and owned by it: it goes away with the app. Losing it never
blocks routing: every call to it is bounded and made from a background task (or the override POST,
which then says ``shared: false``); replicas keep routing on their local state and recreate the board on a
later sync, the survivors republishing their current override.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")

BOARD_NAMESPACE = "llmstack-regions"
STALE_S = 10.0  # an ejection older than this (board time) when a replica first reads it is history, not news
KEEP_EVENTS = 200


class RegionBoard:
    """The shared state (run as a Ray actor): the latest routing override and recent health events."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.routing: dict[str, Any] | None = None
        self.routing_version = 0
        self.events: list[dict[str, Any]] = []
        self.seq = 0

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


class BoardLink:
    """A router replica's side of the board: bounded calls, adopting news, republishing after a board loss.

    Args:
        name: the board actor's name (one per deployed app).
        replica: this replica's id (its own events are not news to it).
        apply_routing: called with a peer's override ``{policy, slo_p95_s, weights}``.
        apply_ejection: called with ``(region, reason)`` for a peer's fresh ejection.
        local_routing: the override this replica routes on now (republished to a new board).
        connect: returns the board's handle (tests pass a fake); default: get or create the Ray actor.
    """

    def __init__(self, name: str, replica: str, *, apply_routing: Callable[[dict[str, Any]], None],
                 apply_ejection: Callable[[str, str], None], local_routing: Callable[[], dict[str, Any]],
                 connect: Callable[[], Any] | None = None, timeout_s: float = 2.0) -> None:
        self.name = name
        self.replica = replica
        self.apply_routing = apply_routing
        self.apply_ejection = apply_ejection
        self.local_routing = local_routing
        self.connect = connect or self._ray_board
        self.timeout_s = timeout_s
        self.handle: Any = None
        self.board_id: str | None = None
        self.seen_seq = 0
        self.routing_version = 0
        self.overridden = False  # this replica's routing was changed at run time (by it or a peer)
        self.connected = False
        self.last_error: str | None = None

    def _ray_board(self) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return ray.remote(RegionBoard).options(name=self.name, namespace=BOARD_NAMESPACE, get_if_exists=True,
                                               num_cpus=0, scheduling_strategy=here).remote()

    async def _call(self, method: str, *args: Any) -> Any:
        if self.handle is None:
            self.handle = await asyncio.wait_for(asyncio.to_thread(self.connect), self.timeout_s)
        try:
            result = await asyncio.wait_for(_awaitable(getattr(self.handle, method).remote(*args)), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.handle = None  # look it up (or create it) afresh next time
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
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected or self.last_error is None:
                    logger.warning("region board %s unreachable (%s); routing on local state", self.name, exc)
                self.connected = False
            await asyncio.sleep(period_s)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "connected": self.connected, "routing_version": self.routing_version,
                "last_error": self.last_error}


async def _awaitable(ref: Any) -> Any:
    return await ref


def board_name(app_name: str, deploy_id: str) -> str:
    return f"regions-board:{app_name}:{deploy_id}"


def replica_id() -> str:
    """This router replica's Serve id (a random one outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]
