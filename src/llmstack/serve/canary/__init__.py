"""Canary releases on Ray Serve: a router in front of model versions, live KPIs, progressive rollout, rollback.

Topology (one Serve application, plus one side application per version started at run time)::

    HTTP ─▶ CanaryIngress (the OpenAI API of ``http.make_api`` + /canary admin routes, session keys)
               │  generate(request, key) / stream(request, key) over a DeploymentHandle
               ▼
            CanaryRouter ×1 (weights, sticky keys, per-version KPIs, the rollout controller, shadow mirror)
               │  the engine protocol (``ServeEngineClient``) per version
               ▼
            LLMServer "tiny-lm@v1" (stable)      LLMServer "tiny-lm@v2" (candidate)      ...

Rooms: ``config`` (versions, plan, thresholds, resolution), ``kpis`` (live windows), ``controller``
(the rollout state machine, pure, on an injected clock), ``router`` (the deployment that routes and
owns the controller), ``metrics``, ``ingress`` (HTTP + admin routes), ``builder`` (the app and
``deploy_canary``), ``operations`` (driver-side calls for the CLI).

Example:
    >>> dep = deploy_canary({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2",
    ...                      "http": {"port": 8123}})  # doctest: +SKIP
    >>> plan = {"steps": [5, 25, 50, 100], "hold_s": 30}
    >>> canary_start("tiny-lm@v2", app_name=dep.app_name, plan=plan)  # doctest: +SKIP
"""

from __future__ import annotations

from llmstack.serve.canary.builder import CanaryDeployment, build_canary_app, deploy_canary
from llmstack.serve.canary.config import (CanaryConfig, CanaryError, CanaryPlan, CanaryThresholds, VersionSpec,
                                          load_canary_config, resolve_canary)
from llmstack.serve.canary.kpis import is_degenerate
from llmstack.serve.canary.operations import (canary_abort, canary_promote, canary_start, canary_status,
                                              format_status, rollback_app, set_weights)

__all__ = [
    "CanaryConfig", "CanaryDeployment", "CanaryError", "CanaryPlan", "CanaryThresholds", "VersionSpec",
    "build_canary_app", "canary_abort", "canary_promote", "canary_start", "canary_status", "deploy_canary",
    "format_status", "is_degenerate", "load_canary_config", "resolve_canary", "rollback_app", "set_weights",
]
