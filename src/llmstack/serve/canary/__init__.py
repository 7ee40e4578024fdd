"""Canary releases on Ray Serve: model versions side by side, live KPIs, progressive rollout, rollback.

A canary is a policy of the routing layer (:mod:`llmstack.serve.routing`); a canary app is that layer
with one canary, and a multi-region app may run one inside a region (its ``canary:`` block). Topology
(one Serve application, plus one side application per version started at run time)::

    HTTP ─▶ CanaryIngress ×router_replicas (OpenAI API + /canary admin routes; each replica routes by the
               │  weights, sticky keys, measures KPIs, mirrors shadow traffic)      ▲ KPIs / weights
               │  the engine protocol (``ServeEngineClient``) per version           ▼ (every 0.1 s)
               ▼                                                              RoutingBoard ×1 (the rollout
            LLMServer "tiny-lm@v1" (stable)   LLMServer "tiny-lm@v2" (candidate)   controller; registry writes)

This package is the public face of canaries; the code lives in the routing layer: ``routing.canary_config``
(versions, plan, thresholds, resolution), ``routing.kpis`` (live windows), ``routing.controller`` (the rollout
state machine, pure, on an injected clock), ``routing.canary_app`` (the app and ``deploy_canary``; the
``import_path`` ``llmstack.serve.canary:build_canary_app`` of serve_configs/canary.yaml) and
``routing.canary_operations`` (driver-side calls for the CLI). May import: ``serve.routing`` only.

Example:
    >>> dep = deploy_canary({"stable": "tiny-lm@v1", "candidate": "tiny-lm@v2",
    ...                      "http": {"port": 8123}})  # doctest: +SKIP
    >>> plan = {"steps": [5, 25, 50, 100], "hold_s": 30}
    >>> canary_start("tiny-lm@v2", app_name=dep.app_name, plan=plan)  # doctest: +SKIP
"""

from __future__ import annotations

from llmstack.serve.routing.canary_app import CanaryDeployment, build_canary_app, deploy_canary
from llmstack.serve.routing.canary_config import (CanaryConfig, CanaryError, CanaryPlan, CanaryThresholds,
                                                  VersionSpec, load_canary_config, resolve_canary)
from llmstack.serve.routing.canary_operations import (canary_abort, canary_promote, canary_start, canary_status,
                                                      format_status, rollback_app, set_weights)
from llmstack.serve.routing.kpis import is_degenerate

__all__ = [
    "CanaryConfig", "CanaryDeployment", "CanaryError", "CanaryPlan", "CanaryThresholds", "VersionSpec",
    "build_canary_app", "canary_abort", "canary_promote", "canary_start", "canary_status", "deploy_canary",
    "format_status", "is_degenerate", "load_canary_config", "resolve_canary", "rollback_app", "set_weights",
]
