"""Multi-region serving: model replicas pinned per region (Ray nodes marked by a custom resource), one global
router that picks a region per request by cost, latency or turn, ejects failing regions, retries once
elsewhere, and counts each answer's cost.

Rooms: ``config`` (RegionSpec, RoutingConfig, parsing), ``policy`` (the pure router state machine on an
injected clock), ``cost`` (replica-seconds x price, metrics, the ``llmstack cost`` report), ``ingress``
(the router deployment: OpenAI API + /regions), ``builder`` (the app, node checks, ``deploy_regions``).

Example:
    >>> dep = deploy_regions({"model": "tiny-lm@production", "regions": {  # doctest: +SKIP
    ...     "us-east": {"price_per_replica_hour": 2.0}, "eu-west": {"price_per_replica_hour": 1.2,
    ...     "latency_ms": 40}}, "routing": {"policy": "cost", "slo_p95_s": 0.5}})
"""

from __future__ import annotations

from llmstack._modules import lazy_exports

_LAZY = {
    "RegionSpec": "llmstack.serve.regions.config",
    "RegionsConfig": "llmstack.serve.regions.config",
    "RoutingConfig": "llmstack.serve.regions.config",
    "load_regions_config": "llmstack.serve.regions.config",
    "RegionRouter": "llmstack.serve.regions.policy",
    "cost_report": "llmstack.serve.regions.cost",
    "format_cost": "llmstack.serve.regions.cost",
    "build_regions_app": "llmstack.serve.regions.builder",
    "check_region_nodes": "llmstack.serve.regions.builder",
    "deploy_regions": "llmstack.serve.regions.builder",
    "resolve_regions": "llmstack.serve.regions.builder",
    "RegionsDeployment": "llmstack.serve.regions.builder",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
