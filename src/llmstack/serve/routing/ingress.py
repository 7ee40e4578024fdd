"""The routing ingress: the OpenAI API whose engine is a chain of routing policies, N replicas per app.

A request meets the chain top down: the region policy (:class:`~.regions.RegionEngineClient`) when the app
has regions, then the canary policy (:class:`~.canary.CanaryEngine`) of the app or of the chosen region,
then a model deployment. Around the chain: one middleware (:mod:`.headers`), one metrics surface
(:mod:`.metrics`), one link to the board (:mod:`.board`) carrying region news and canary news off the
request path, and the admin routes: ``/canary`` (start, promote, abort, rollback, weights; ``?region=``
names a region's canary) and ``/regions`` (status, routing override).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from llmstack.config import ServeConfig, load_config
from llmstack.errors import LLMStackError, RequestError
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.deployments.ingress import ingress_api
from llmstack.serve.http import error_response
from llmstack.serve.http.metrics import append_metrics
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard
from llmstack.serve.routing.board import EXCHANGE_S, BoardLink, board_name, canary_scopes, replica_id
from llmstack.serve.routing.canary import CanaryEngine, serve_client
from llmstack.serve.routing.headers import RoutingHeaders
from llmstack.serve.routing.metrics import CanaryMetrics
from llmstack.serve.routing.regions import RegionEngineClient


class RoutingEngine:
    """The engine protocol over the app's chain of policies, with the background work they need.

    Args:
        handles: ``{"canary": {version: handle}}`` for a canary app; ``{"regions": {region: handle, or
            {version: handle} for a region with a canary}}`` for a multi-region app.
        spec: the app's resolved routing spec (``serve``, and ``canary`` and/or ``regions`` + ``routing``).
        board: the app's ``RoutingBoard`` deployment handle (None: no shared state, unit tests).
    """

    def __init__(self, handles: dict[str, Any], spec: dict[str, Any], board: Any = None) -> None:
        self.spec = spec
        self.config = load_config(ServeConfig, spec["serve"])
        retry = self.config.http.retry_after_s
        regions = spec.get("regions") or {}
        self.canary_metrics = CanaryMetrics(in_regions=bool(regions))
        self._wake: asyncio.Event | None = None  # set: exchange with the board now (a candidate answered badly)
        self.canaries: dict[str, CanaryEngine] = {}
        for scope, (data, _) in canary_scopes(spec).items():
            version_handles = handles["canary"] if scope == "" else handles["regions"][scope]
            clients = {name: ServeEngineClient(h, retry_after_s=retry) for name, h in version_handles.items()}
            self.canaries[scope] = CanaryEngine(scope, data, clients, connect=serve_client(retry),
                                                metrics=self.canary_metrics, notify=self._evidence)
        connect = (lambda: board) if board is not None else None
        self.regions: RegionEngineClient | None = None
        if regions:
            plain = {name: h for name, h in handles["regions"].items() if name not in self.canaries}
            self.regions = RegionEngineClient({**plain, **{n: None for n in self.canaries}}, spec, connect=connect,
                                              engines=dict(self.canaries))
            self.top: Any = self.regions
            self.link = self.regions.board
            self.attempt_timeout_s: float | None = self.regions.cfg.attempt_timeout_s  # bounds admission too
        else:
            self.attempt_timeout_s = None
            self.top = self.canaries[""]
            self.link = None if board is None else BoardLink(
                board_name(self.config.app_name, spec.get("deploy_id", "")), replica_id(), connect=connect)
        if self.link is not None and self.canaries:
            self.link.reports = self._reports
            self.link.apply_views = self._adopt
        self._exchange: asyncio.Task | None = None

    def start(self) -> None:
        """Start (or restart) the background work: region probes and board syncs, the canary exchange."""
        if self.regions is not None:
            self.regions.start_probes()
        if self.link is not None and self.canaries and (self._exchange is None or self._exchange.done()):
            self._wake = asyncio.Event()
            self._exchange = asyncio.get_running_loop().create_task(self.link.run_exchange(EXCHANGE_S, self._wake))

    def _evidence(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _reports(self) -> dict[str, Any]:
        return {scope: engine.report() for scope, engine in self.canaries.items()}

    def _adopt(self, views: dict[str, Any]) -> None:
        for scope, view in views.items():
            if scope in self.canaries:
                self.canaries[scope].adopt(view)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.start()
        return await self.top.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.start()
        async for chunk in self.top.stream(request):
            yield chunk

    async def models(self) -> list[ModelCard]:
        return await self.top.models()

    async def check_health(self) -> None:
        self.start()
        await self.top.check_health()

    async def abort(self, request_id: str) -> bool:
        return await self.top.abort(request_id)

    async def metrics_text(self) -> str:
        text = self.regions.metrics.render(self.regions.router) if self.regions is not None else ""
        return text + (self.canary_metrics.render(self.canaries) if self.canaries else "")


def routing_api(engine: RoutingEngine, board: Any, drain_board: Any = None) -> Any:
    """The OpenAI app over ``engine`` with the admin routes of its policies, its metrics and its middleware.

    Like every ingress (:func:`~llmstack.serve.deployments.ingress.ingress_api`) it admits by predicted time
    and drains when ``drain_board`` (the app's ``DrainBoard``, from ``deploy_canary``/``deploy_regions``) says so.
    """
    app = ingress_api(engine, engine.config, drain_board)
    if engine.canaries:
        _add_canary_routes(app, board)
    if engine.regions is not None:
        _add_region_routes(app, engine.regions)
    append_metrics(app, engine.metrics_text, summary="Prometheus metrics (with the routing policies' own)")
    headers = {session_header_of(engine.spec, scope) for scope in engine.canaries}
    app.add_middleware(RoutingHeaders, session_header=next(iter(headers), None),
                       max_body_bytes=engine.config.http.max_body_bytes)
    app.router.on_startup.append(engine.start)
    return app


def session_header_of(spec: dict[str, Any], scope: str) -> str:
    """The session header of the canary at ``scope`` (its ``session_header`` key)."""
    data = spec["canary"] if scope == "" else spec["regions"][scope]["canary"]
    return str(data["canary"].get("session_header") or "x-session-id")


def _json(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(json.loads(json.dumps({"ok": True, **data}, default=str)))


async def _body_of(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise RequestError("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    return data


def _add_canary_routes(app: Any, board: Any) -> None:
    """``/canary`` admin routes: each a call on the board's canary (``?region=`` names a region's)."""

    async def reply(request: Request, method: str, *args: Any, **kwargs: Any) -> JSONResponse:
        try:
            result = await board.canary.remote(request.query_params.get("region"), method, *args, **kwargs)
        except Exception as exc:  # the board's llmstack errors, unwrapped from Ray's, map to their status
            return error_response(exc)
        return _json(result)

    @app.get("/canary", summary="Canary status: versions, weights, live KPIs, the rollout in progress")
    async def canary_status_route(request: Request) -> JSONResponse:
        return await reply(request, "status")

    @app.post("/canary/start", summary="Start a rollout of a deployed version: {candidate, plan?, thresholds?, force?}")
    async def canary_start_route(request: Request) -> JSONResponse:
        b = await _body_of(request)
        if not isinstance(b.get("candidate"), str):
            raise RequestError("candidate: a deployed version name or registry ref is required", param="candidate")
        return await reply(request, "start", b["candidate"], plan=b.get("plan"), thresholds=b.get("thresholds"),
                           force=bool(b.get("force", False)))

    @app.post("/canary/promote", summary="Promote the candidate now: {force?, reason?}")
    async def canary_promote_route(request: Request) -> JSONResponse:
        b = await _body_of(request)
        return await reply(request, "promote", force=bool(b.get("force", False)), reason=b.get("reason"))

    @app.post("/canary/abort", summary="Abort the canary: the candidate's share drops to 0: {reason?}")
    async def canary_abort_route(request: Request) -> JSONResponse:
        b = await _body_of(request)
        return await reply(request, "abort_canary", reason=b.get("reason"))

    @app.post("/canary/rollback", summary="Route back to the previous version and roll the alias back: {reason?}")
    async def canary_rollback_route(request: Request) -> JSONResponse:
        b = await _body_of(request)
        return await reply(request, "rollback", reason=b.get("reason"))

    @app.post("/canary/weights", summary="Static traffic split between deployed versions: {weights: {name: pct}}")
    async def canary_weights_route(request: Request) -> JSONResponse:
        b = await _body_of(request)
        if not isinstance(b.get("weights"), dict):
            raise RequestError("weights: a mapping of version name to percent is required", param="weights")
        try:
            weights = {str(k): float(v) for k, v in b["weights"].items()}
        except (TypeError, ValueError):
            raise RequestError("weights: percentages must be numbers", param="weights") from None
        return await reply(request, "set_weights", weights)


def _add_region_routes(app: Any, regions: RegionEngineClient) -> None:
    """``GET /regions`` (health, p95, prices, policy, events) and ``POST /regions/routing`` (override)."""

    @app.get("/regions", summary="Regions: health, p95, in flight, prices, the policy and recent events")
    async def regions_status() -> JSONResponse:
        return _json(regions.status())

    @app.post("/regions/routing", summary="Change routing now: {policy?, slo_p95_s?, weights?} "
              "(weights {} clears the manual override)")
    async def regions_routing(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return error_response(RequestError("request body is not valid JSON", code="invalid_json"))
        if not isinstance(body, dict) or set(body) - {"policy", "slo_p95_s", "weights"}:
            return error_response(RequestError("expected a JSON object with policy, slo_p95_s and/or weights",
                                               param="body"))
        weights = body.get("weights")
        if weights is not None and not isinstance(weights, dict):
            return error_response(RequestError("weights: a mapping of region to share is required",
                                               param="weights"))
        try:
            regions.router.set_routing(policy=body.get("policy"), slo_p95_s=body.get("slo_p95_s"))
            if weights is not None:
                regions.router.set_weights(weights)
        except (LLMStackError, TypeError, ValueError) as exc:
            return error_response(exc if isinstance(exc, LLMStackError) else RequestError(str(exc)))
        shared = await regions.share_routing()  # the other router replicas adopt it on their next sync
        return _json({"shared": shared, **regions.status()})


@serve.deployment
@serve.ingress()
class RoutingIngress:
    """HTTP ingress of a routed app (canary, multi-region, or both): the OpenAI API over the policy chain.

    Its Serve name is the app kind's (``CanaryIngress``, ``RegionIngress``); it runs N replicas.
    """

    def __init__(self, handles: dict[str, Any], spec: dict[str, Any], board: Any = None,
                 drain_board: Any = None) -> None:
        self.engine = RoutingEngine(handles, spec, board)
        self.board = board
        self.drain_board = drain_board  # the DrainBoard actor of deploy_canary/deploy_regions; None: `serve run`

    def __serve_build_asgi_app__(self) -> Any:
        return routing_api(self.engine, self.board, self.drain_board)

    async def probe_now(self) -> dict[str, bool]:
        """One probe round of every region now (tests and benchmarks)."""
        assert self.engine.regions is not None, "this app has no regions"
        return await self.engine.regions.probe_all()

    async def status(self) -> dict[str, Any]:
        """The region policy's status (multi-region apps)."""
        assert self.engine.regions is not None, "this app has no regions"
        return self.engine.regions.status()
