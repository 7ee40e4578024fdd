"""The routing layer: one ingress (N replicas) routing each request through a chain of policies.

Owns: the policy chain on the request path (``regions``: a region per request, retries, health, cost;
``canary``: a version per request by weight, sticky keys, KPIs, shadow traffic), the one middleware
(``headers``), the one metrics surface (``metrics``), the shared state off the request path (``board``:
region news and each canary's ``rollout`` owner, which ticks the plan and writes the registry), the pure
policy state (``canary_config``, ``kpis``, ``controller``; ``regions_config``, ``region_policy``, ``cost``)
and the one builder path (``builder``) that the canary and regions apps are assembled on (``canary_app``,
``canary_operations``, ``regions_app``).

May import: ``llmstack.config``, ``errors``, ``registry``, ``_ray``, ``serve.protocol``, ``serve.http`` and
``serve.deployments``. ``serve.canary`` and ``serve.regions`` are its public faces (they import it, never the
other way), and the ``import_path`` of the shipped canary and multi-region YAML files.

A canary inside one region is a region whose config carries a ``canary:`` block; its split, plan and
promotion touch that region only.
"""
