"""The HTTP ingress deployment: the OpenAI app of :func:`~llmstack.serve.http.make_api` over a backend handle."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from ray import serve

from llmstack.config import ServeConfig, load_config
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.deployments.drain import start_following
from llmstack.serve.http.app import make_api


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    """HTTP ingress deployment: the OpenAI API in front of a model (or router) deployment handle."""

    def __init__(self, backend: Any, config: dict[str, Any], drain_board: Any = None) -> None:
        self.config = load_config(ServeConfig, config)
        self.drain_board = drain_board  # the DrainBoard actor of deploy(); None under `serve run`
        self.engine = ServeEngineClient(backend, retry_after_s=self.config.http.retry_after_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = make_api(self.engine, self.config)
        # Runs on the replica's event loop: the drain of a SIGTERM to the deploying process reaches every replica.
        start_following(self.drain_board, app.state.drain, replica=uuid.uuid4().hex)
        return app
