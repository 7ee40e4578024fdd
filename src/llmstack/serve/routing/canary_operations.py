"""Driver-side canary operations on a running app: what ``llmstack canary start|status|promote|abort`` and
``llmstack rollback --app`` call. Each is a call on the app's routing board (where its canaries live, off
the request path); its errors are llmstack errors (CanaryError, ValidationFailedError, ConfigError,
ArtifactNotFoundError), raised as themselves. ``region`` names a region's canary in a multi-region app
(None: the app's only canary)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ray import serve

from llmstack._ray import connect
from llmstack.config import ServeConfig, load_config
from llmstack.errors import ConfigError, LLMStackError, ValidationFailedError
from llmstack.serve.routing.canary_config import (CanaryError, CanaryPlan, CanaryThresholds, VersionSpec, check_weights,
                                          refusal, resolve_version)
from llmstack.serve.deployments.builder import delete_app, wait_running
from llmstack.serve.routing.board import BOARD
from llmstack.serve.routing.builder import version_deployment


class _Canary:
    """One canary of a running app, reached through the app's board: ``call("status")`` etc."""

    def __init__(self, board: Any, region: str | None) -> None:
        self.board = board
        self.region = region

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """An admin call from the driver: its llmstack error (unwrapped from Ray's) is raised as itself."""
        try:
            return self.board.canary.remote(self.region, method, *args, **kwargs).result()
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LLMStackError):
                raise cause from None
            raise


def _router(app_name: str, address: str | None, region: str | None = None) -> _Canary:
    connect(address, require_running=True)
    try:
        status = serve.status()
    except Exception as exc:
        raise CanaryError(f"Ray Serve is not running on this cluster: {exc}") from None
    app = status.applications.get(app_name)
    if app is None or BOARD not in app.deployments:
        routed = [n for n, a in status.applications.items() if BOARD in a.deployments]
        raise CanaryError(f"no canary app named {app_name!r} is running (apps with canaries or regions: "
                          f"{', '.join(routed) or 'none'}); start one with serve_configs/canary.yaml")
    return _Canary(serve.get_deployment_handle(BOARD, app_name=app_name), region)


def canary_status(*, app_name: str = "llmstack-canary", address: str | None = None,
                  region: str | None = None) -> dict[str, Any]:
    """Status of a running canary app: versions, weights, live KPIs, the rollout in progress.

    Example:
        >>> print(format_status(canary_status(app_name="llmstack-canary")))  # doctest: +SKIP
    """
    return _router(app_name, address, region).call("status")


def canary_start(candidate: str, *, app_name: str = "llmstack-canary", plan: dict[str, Any] | None = None,
                 thresholds: dict[str, Any] | None = None, force: bool = False, address: str | None = None,
                 timeout_s: float = 300.0, region: str | None = None) -> dict[str, Any]:
    """Start a progressive rollout of ``candidate`` (a registry ref or a deployed version's name).

    A ref the app does not serve yet is deployed first, as a side application ``<app>--<version>`` with
    the app's serving settings (existing replicas are untouched), then the plan begins.

    Raises:
        ArtifactNotFoundError: the candidate is not in the registry.
        CanaryError: a canary is already running (or the app is not running).
        ValidationFailedError: its validation report failed (or is missing) and ``force`` is not set.
        ConfigError: a bad plan or thresholds.
    """
    router = _router(app_name, address, region)
    status = router.call("status")
    if status["running"]:
        c = status["canary"]
        raise CanaryError(f"a canary of {c['candidate']} is already running in app {app_name!r} ({c['phase']}); "
                          "promote or abort it first")
    if plan is not None:
        load_config(CanaryPlan, plan)
    if thresholds is not None:
        load_config(CanaryThresholds, thresholds)
    name = router.call("lookup", candidate)
    if name is None:
        serve_cfg = load_config(ServeConfig, status["serve"])
        version = resolve_version(VersionSpec(model=candidate), serve_cfg, taken=set(status["versions"]),
                                  role="candidate")
        name = router.call("lookup", version.ref or version.name)
        steps = (plan or status["canary_defaults"]["plan"]).get("steps", [1])
        if name is None and version.ref and not force and steps:
            from llmstack.registry import Registry

            ok, why = Registry(serve_cfg.registry).check_gate(version.ref, status["alias"])
            if not ok:  # refuse before deploying anything
                raise ValidationFailedError(refusal(version.ref, why))
        if name is None:
            side = f"{app_name}--{re.sub(r'[^A-Za-z0-9_.-]+', '-', (region + '--' if region else '') + version.name)}"
            version.app = side
            deployment = version_deployment(dataclasses.asdict(version), resource=status.get("resource"))
            serve.run_many([serve.RunTarget(deployment, name=side, route_prefix=None)],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
            try:
                wait_running(side, timeout_s=timeout_s, what="version application")
            except BaseException:  # not left registered: a corrected retry must be able to start it
                delete_app(side)
                raise
            router.call("add_version", version.name, version.ref, side, version.deployment)
            name = version.name
    return router.call("start", name, plan=plan, thresholds=thresholds, force=force)


def canary_promote(*, app_name: str = "llmstack-canary", force: bool = False, reason: str | None = None,
                   address: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Promote the candidate now: it takes 100% of traffic and the registry alias moves (Registry.promote).

    Raises:
        ValidationFailedError: its validation report failed or is missing (unless ``force``; a forced
            promotion is recorded as ``force-promote`` in the registry history).
        CanaryError: no canary to promote.
    """
    return _router(app_name, address, region).call("promote", force=force, reason=reason)


def canary_abort(*, app_name: str = "llmstack-canary", reason: str | None = None,
                 address: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Abort the running canary: the candidate's share drops to 0 at once; in-flight requests finish."""
    return _router(app_name, address, region).call("abort_canary", reason=reason)


def rollback_app(*, app_name: str = "llmstack-canary", reason: str | None = None,
                 address: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Route a running app back to its previous version and roll the registry alias back (no restarts).

    During a canary this aborts it. Returns ``{"ok", "status", "registry_event"}``.
    """
    return _router(app_name, address, region).call("rollback", reason=reason)


def set_weights(weights: dict[str, float], *, app_name: str = "llmstack-canary",
                address: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Set a static traffic split between deployed versions. Raises ConfigError unless they sum to 100."""
    problems = check_weights({k: float(v) for k, v in weights.items()}, known=None)
    if problems:
        raise ConfigError(problems)
    return _router(app_name, address, region).call("set_weights", weights)


def format_status(status: dict[str, Any]) -> str:
    """A terminal-readable view of :func:`canary_status`."""
    lines = [f"app {status['app']}: stable {status['stable']}"
             + (f", previous {status['previous']}" if status.get("previous") else "")]
    lines.append(f"{'version':<28} {'weight':>6} {'reqs':>6} {'err%':>6} {'bad%':>6} {'p50 ms':>8} "
                 f"{'p95 ms':>8} {'ttft ms':>8}")
    for name, v in status["versions"].items():
        k = v["kpis"]

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{1000 * x:.0f}"

        lines.append(f"{name:<28} {v['weight']:>6.1f} "
                     f"{k['requests']:>6} {100 * k['error_rate']:>6.1f} {100 * k['bad_output_rate']:>6.1f} "
                     f"{ms(k['p50_s']):>8} {ms(k['p95_s']):>8} {ms(k['ttft_p50_s']):>8}")
    c = status.get("canary")
    if c:
        lines.append(f"canary {c['candidate']}: {c['state']} ({c['phase']}, {c['share']:g}%)"
                     + (f" - {c['reason']}" if c.get("reason") else ""))
        if c.get("first_bad_to_zero_s") is not None:
            lines.append(f"  first bad response -> 0% traffic: {c['first_bad_to_zero_s']:.2f} s")
    return "\n".join(lines)
