"""The HTTP ingress deployment: the OpenAI app of :func:`~llmstack.serve.http.make_api` over a backend handle.

:func:`ingress_api` is the app every ingress deployment serves (this plain one and the routing ingress of
canary and multi-region apps): the OpenAI API with time-based admission and a drain, following the app's
:class:`~llmstack.serve.deployments.drain.DrainBoard` so SIGTERM to the deploying process drains it.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from ray import serve

from llmstack.config import ServeConfig, load_config
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.deployments.drain import start_following
from llmstack.serve.http.app import make_api


def ingress_api(engine: Any, config: ServeConfig | dict[str, Any], drain_board: Any = None) -> FastAPI:
    """The OpenAI app of one ingress replica over ``engine``: every generation route admitted by predicted
    time (503 + Retry-After) and refused while draining; the drain starts when ``drain_board`` (the app's
    ``DrainBoard`` actor; None under ``serve run``) says so.

    Call it on the replica's event loop (``__serve_build_asgi_app__``): the drain follower is a task of it.
    """
    app = make_api(engine, config)
    start_following(drain_board, app.state.drain, replica=uuid.uuid4().hex)
    return app


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    """HTTP ingress deployment: the OpenAI API in front of a model (or router) deployment handle."""

    def __init__(self, backend: Any, config: dict[str, Any], drain_board: Any = None) -> None:
        self.config = load_config(ServeConfig, config)
        self.drain_board = drain_board  # the DrainBoard actor of deploy(); None under `serve run`
        self.engine = ServeEngineClient(backend, retry_after_s=self.config.http.retry_after_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_api(self.engine, self.config, self.drain_board)
