"""Router replicas sharing overrides and ejections through the board (the board in-process, no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

from llmstack.serve.routing.board import RoutingBoard
from llmstack.serve.routing.regions_config import load_regions_config, spec_of
from llmstack.serve.routing.regions import RegionEngineClient

from .test_region_client import FakeRegion, request


class Handle:
    """A Ray actor handle's shape over an in-process board; ``down`` makes every call fail."""

    def __init__(self, board: RoutingBoard) -> None:
        self.board = board
        self.down = False

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def call() -> Any:
                    if handle.down:
                        raise ConnectionError("board lost")
                    return getattr(handle.board, method)(*args)
                return call()
        return Method


def replicas(shared: Handle, n: int = 2) -> list[RegionEngineClient]:
    cfg, serve_cfg = load_regions_config({"regions": {"a": {"price_per_replica_hour": 3.6},
                                                      "b": {"price_per_replica_hour": 1.8}},
                                          "routing": {"policy": "cost", "router_replicas": n}})
    out = []
    for _ in range(n):
        client = RegionEngineClient({"a": None, "b": None}, {**spec_of(cfg, serve_cfg), "deploy_id": "d1"})
        client.clients = {"a": FakeRegion("a"), "b": FakeRegion("b")}  # type: ignore[assignment]
        client.board.connect = lambda: shared  # type: ignore[union-attr]
        out.append(client)
    return out


async def synced(n: int = 2) -> tuple[Handle, list[RegionEngineClient]]:
    """``n`` replicas on one board, each past its first sync."""
    handle = Handle(RoutingBoard())
    clients = replicas(handle, n)
    for r in clients:
        await r.board.sync()
    return handle, clients


def test_an_override_on_one_replica_reaches_the_other_and_a_late_one() -> None:
    async def scenario() -> None:
        handle = Handle(RoutingBoard())
        one, two, late = replicas(handle, 3)
        for r in (one, two):
            await r.board.sync()
        one.router.set_weights({"a": 1})
        assert await one.share_routing() is True
        assert two.router.weights == {}  # not yet: news travels on the next sync
        await two.board.sync()
        await late.board.sync()  # first contact: adopts the current override
        for r in (one, two, late):
            assert r.router.weights == {"a": 1.0} and r.router.choose().region == "a"
        two.router.set_routing(policy="round_robin")
        await two.share_routing()
        await one.board.sync()
        assert one.router.cfg.policy == "round_robin" and one.router.weights == {"a": 1.0}

    asyncio.run(scenario())


def test_an_ejection_on_one_replica_ejects_on_the_other_not_back_on_itself() -> None:
    async def scenario() -> None:
        _, (one, two) = await synced()
        for r in (one, two):
            r.router.probed("b", True)  # seen up
        one.clients["b"].fail = ConnectionError("down")  # type: ignore[attr-defined]
        await one.probe("b")
        await one.probe("b")
        assert not one.router.regions["b"].healthy
        await asyncio.sleep(0)  # the publish task
        await asyncio.gather(*one._board_calls)
        assert two.router.regions["b"].healthy
        await two.board.sync()
        eu = two.router.regions["b"]
        assert not eu.healthy and eu.totals["ejections"] == 1
        assert two.router.events[-1]["reason"].startswith(f"peer {one.replica}")
        await one.board.sync()
        assert one.router.regions["b"].totals["ejections"] == 1  # its own news is not news to it

    asyncio.run(scenario())


def test_a_lost_board_never_blocks_routing_and_a_new_one_gets_the_override_again() -> None:
    async def scenario() -> None:
        handle, (one, two) = await synced()
        one.router.set_weights({"a": 1})
        await one.share_routing()
        await two.board.sync()
        handle.down = True
        two.router.set_weights({"b": 1})
        assert await two.share_routing() is False  # said in the POST's answer as shared: false
        assert (await two.generate(request())).choices[0].text == "b"  # routing goes on, on local state
        handle.board, handle.down = RoutingBoard(), False  # the board came back empty (its owner was lost)
        await two.board.sync()  # republishes its override
        await one.board.sync()
        assert one.router.weights == {"b": 1.0}
        assert two.board.status()["connected"] is True

    asyncio.run(scenario())

