"""Multi-region serving: model replicas pinned per region (Ray nodes marked by a custom resource), the routing
layer's region policy in front (:mod:`llmstack.serve.routing`): a region per request by cost, latency or
turn, failing regions ejected, a request retried once elsewhere, each answer's cost counted. A region may
carry a canary of its own (its ``canary:`` block).

This package is the public face of multi-region serving; the code lives in the routing layer:
``routing.regions_config`` (RegionSpec, RoutingConfig, parsing), ``routing.region_policy`` (the pure region
router on an injected clock), ``routing.cost`` (replica-seconds x price, metrics, the ``llmstack cost``
report) and ``routing.regions_app`` (resolution, node checks, ``deploy_regions``; the ``import_path``
``llmstack.serve.regions:build_regions_app``). May import: ``serve.routing`` only.

Example:
    >>> dep = deploy_regions({"model": "tiny-lm@production", "regions": {  # doctest: +SKIP
    ...     "us-east": {"price_per_replica_hour": 2.0}, "eu-west": {"price_per_replica_hour": 1.2,
    ...     "latency_ms": 40}}, "routing": {"policy": "cost", "slo_p95_s": 0.5}})
"""

from __future__ import annotations

from llmstack._modules import lazy_exports

_LAZY = {
    "llmstack.serve.routing.regions_config": ("RegionSpec", "RegionsConfig", "RoutingConfig", "load_regions_config"),
    "llmstack.serve.routing.region_policy": ("RegionRouter",),
    "llmstack.serve.routing.cost": ("cost_report", "format_cost"),
    "llmstack.serve.routing.regions_app": ("build_regions_app", "check_region_nodes", "deploy_regions", "resolve_regions", "RegionsDeployment"),
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(name for names in _LAZY.values() for name in names)
