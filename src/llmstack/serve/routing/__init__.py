"""The routing layer: one ingress (N replicas) routing each request through a chain of policies.

Owns: the policy chain on the request path (``regions``: a region per request, retries, health, cost;
``canary``: a version per request by weight, sticky keys, KPIs, shadow traffic), the one middleware
(``headers``), the one metrics surface (``metrics``), the shared state off the request path (``board``:
region news and each canary's ``rollout`` owner, which ticks the plan and writes the registry), and the
one builder path (``builder``) that ``serve.canary`` and ``serve.regions`` assemble their apps with.

May import: ``llmstack.config``, ``errors``, ``registry``, ``serve.protocol``, ``serve.http``,
``serve.deployments`` and the pure policy rooms ``serve.canary`` (config, controller, kpis) and
``serve.regions`` (config, policy, cost). The other way, only their assembly uses it (``canary.builder``,
``canary.operations``, ``regions.builder``) and ``regions.config`` its header names, so no module imports
itself back. Nothing outside ``serve`` imports it: apps are built through ``serve.canary`` and
``serve.regions``.

A canary inside one region is a region whose config carries a ``canary:`` block; its split, plan and
promotion touch that region only.
"""
