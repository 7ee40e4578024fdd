"""deploy()'s refusals on a cluster where Serve already runs: a failed start cleaned up, a taken route prefix and
a port Serve does not hold named in one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import deploy_app

from llmstack.errors import ConfigError, ModelLoadError, ResourceError

pytestmark = pytest.mark.ray


def _apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def test_a_failed_deploy_is_deleted_so_the_corrected_retry_starts(serve_registry: dict, serve_port: int,
                                                                   tmp_path: Path) -> None:
    """The failed app once stayed registered: the corrected retry was refused as "already running"."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="'retry' failed to start"):
        deploy_app(serve_registry, serve_port, model=str(empty), app_name="retry", route_prefix="/retry")
    assert "retry" not in _apps()
    app = deploy_app(serve_registry, serve_port, app_name="retry", route_prefix="/retry")
    app.shutdown()


def test_a_taken_route_prefix_names_both_apps(main_app, serve_registry: dict, serve_port: int) -> None:
    with pytest.raises(ConfigError) as refusal:
        deploy_app(serve_registry, serve_port, app_name="clash", route_prefix="/main")
    message = str(refusal.value)
    assert "route_prefix: '/main' is already served by the application 'main'" in message
    assert "'clash' cannot take it" in message
    assert "clash" not in _apps()


def test_a_port_serve_does_not_hold_is_refused_naming_the_held_port(serve_registry: dict, serve_port: int) -> None:
    """deploy(port=...) beside a running Serve once answered on Serve's port, silently ignoring the asked one."""
    asked = serve_port + 1
    with pytest.raises(ResourceError) as refusal:
        deploy_app(serve_registry, asked, app_name="other-port", route_prefix="/other-port")
    message = str(refusal.value)
    assert f"asks for port {asked}" in message and f"already serves HTTP on port {serve_port}" in message
    assert f"deploy with port={serve_port}" in message
    assert "other-port" not in _apps()
