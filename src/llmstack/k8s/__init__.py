"""KubeRay manifests from llmstack's own configs: a ``RayJob`` to train or fine-tune, a ``RayService`` to serve.

The same files run in both places: ``train.yaml`` with ``llmstack train`` and as a RayJob,
``serve_configs/tiny.yaml`` with ``serve run`` and as a RayService. Secrets stay in Kubernetes
Secrets: the manifest only names them.

May import: ``config``, ``errors``, ``serve`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.k8s import render_manifest, manifest_yaml
    >>> svc = render_manifest("serve", "serve_configs/tiny.yaml", image="ghcr.io/acme/llmstack:0.1",
    ...                       overrides=["registry=s3://ml/registry"])  # doctest: +SKIP
    >>> print(manifest_yaml(svc))  # doctest: +SKIP
"""

from __future__ import annotations

from llmstack.k8s.manifest import manifest_yaml, render_manifest, write_manifest
from llmstack.k8s.options import K8sOptions, load_k8s_options
from llmstack.k8s.stage import KINDS

__all__ = ["KINDS", "K8sOptions", "load_k8s_options", "manifest_yaml", "render_manifest", "write_manifest"]
