"""Serve builders for a RayService whose API key lives in a Kubernetes Secret.

A manifest never holds the key: the pods get it as ``LLMSTACK_API_KEY`` from a ``secretKeyRef``, and
these builders put it into the app's args before calling llmstack's own builders. ``serveConfigV2``
names them only when ``k8s.api_key_secret`` is set; otherwise it names ``llmstack.serve:build_app``
(or the canary builder) exactly as ``serve_configs/*.yaml`` do.
"""

from __future__ import annotations

import os
from typing import Any

from llmstack.config import merge_sections
from llmstack.errors import ConfigError

API_KEY_ENV = "LLMSTACK_API_KEY"
BUILDERS = {  # llmstack's builder -> the one that adds the key from the environment
    "llmstack.serve:build_app": "llmstack.k8s.builders:build_app",
    "llmstack.serve.canary:build_canary_app": "llmstack.k8s.builders:build_canary_app",
}


def with_api_key(args: dict[str, Any] | None) -> dict[str, Any]:
    """``args`` with ``http.api_key`` read from ``$LLMSTACK_API_KEY``.

    Raises:
        ConfigError: the variable is unset or empty (the Secret reference did not resolve).

    Example:
        >>> with_api_key({"model": "tiny-lm@v1"})  # in a pod with LLMSTACK_API_KEY=k  # doctest: +SKIP
        {'model': 'tiny-lm@v1', 'http': {'api_key': 'k'}}
    """
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        raise ConfigError(f"http.api_key: ${API_KEY_ENV} is empty in this pod; the manifest's Secret reference "
                          "(k8s.api_key_secret) must name an existing Secret and key")
    return merge_sections(args or {}, {"http": {"api_key": key}})


def build_app(args: dict[str, Any] | None = None) -> Any:
    """``llmstack.serve:build_app`` with the API key from the pod's environment."""
    from llmstack.serve import build_app as build

    return build(with_api_key(args))


def build_canary_app(args: dict[str, Any] | None = None) -> Any:
    """``llmstack.serve.canary:build_canary_app`` with the API key from the pod's environment."""
    from llmstack.serve.canary import build_canary_app as build

    return build(with_api_key(args))
