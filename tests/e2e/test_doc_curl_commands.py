"""Every `curl` line the project ships (README, serve_configs/*.yaml comments) works as written.

Each line is extracted from the shipped text; those that post a body must say it is JSON, and those
that reach the OpenAI API are run with the real `curl` against the real ingress app (uvicorn on
loopback, a tiny registered model, no Ray), with only `localhost:8000` swapped for a free port.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC_ADDRESS = "localhost:8000"
BODY_FLAGS = {"-d", "--data", "--data-raw", "--data-binary", "--json"}


def _curl_lines(shell_text: str) -> list[str]:
    """``curl`` commands in shell text, backslash continuations joined."""
    lines = (line.strip() for line in shell_text.replace("\\\n", " ").splitlines())
    return [line for line in lines if line.startswith("curl ")]


def _readme_curl_commands() -> list[str]:
    """``curl`` commands in the README's ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [command for block in blocks for command in _curl_lines(block)]


def _yaml_curl_commands(path: Path) -> list[str]:
    """``curl`` commands in the comment lines of a shipped Serve config."""
    comments = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    return _curl_lines("\n".join(comments))


def doc_curl_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every shipped curl line."""
    found = [("README.md", c) for c in _readme_curl_commands()]
    for path in sorted((REPO / "serve_configs").glob("*.yaml")):
        found += [(f"serve_configs/{path.name}", c) for c in _yaml_curl_commands(path)]
    return found


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)  # a trailing `# note` is a shell comment


def _headers(argv: list[str]) -> dict[str, str]:
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-H", "--header")]
    return {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in values)}


def _sends_body(argv: list[str]) -> bool:
    return any(arg in BODY_FLAGS for arg in argv)


COMMANDS = doc_curl_commands()
IDS = [f"{where}:{i}" for i, (where, _) in enumerate(COMMANDS)]


def test_the_docs_ship_curl_commands() -> None:
    where = {w for w, _ in COMMANDS}
    assert {"README.md", "serve_configs/tiny.yaml", "serve_configs/canary.yaml"} <= where
    assert all(DOC_ADDRESS in command for _, command in COMMANDS), COMMANDS


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=IDS)
def test_curl_that_posts_a_body_says_it_is_json(where: str, command: str) -> None:
    argv = _argv(command)
    if not _sends_body(argv):
        return
    assert _headers(argv).get("content-type") == "application/json", (
        f"{where}: `{command}` posts a body without -H 'Content-Type: application/json'")


@pytest.fixture(scope="module")
def ingress_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The OpenAI ingress (llmstack.serve.http.make_api) around a tiny ``tiny-lm@production``, on uvicorn."""
    import uvicorn

    from llmstack.serve._testing import make_registry
    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.http import make_api

    info = make_registry(str(tmp_path_factory.mktemp("curl") / "registry"), adapters=0)
    engine = TransformersEngine.from_source("tiny-lm@production", registry=info["registry"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_api(engine, {}), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def _api_path(argv: list[str]) -> str:
    url = next(arg for arg in argv if DOC_ADDRESS in arg)
    return url.split(DOC_ADDRESS, 1)[1].split("?")[0]


API_COMMANDS = [(w, c) for w, c in COMMANDS if _api_path(_argv(c)).startswith("/v1/")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
@pytest.mark.parametrize(("where", "command"), API_COMMANDS,
                         ids=[f"{w}:{i}" for i, (w, _) in enumerate(API_COMMANDS)])
def test_curl_command_gets_an_answer(where: str, command: str, ingress_url: str, tmp_path: Path) -> None:
    argv = [arg.replace(DOC_ADDRESS, ingress_url) for arg in _argv(command)]
    body = tmp_path / "body.json"
    proc = subprocess.run([*argv, "-sS", "-o", str(body), "-w", "%{http_code}", "--max-time", "60"],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    answer: Any = json.loads(body.read_text())
    assert proc.stdout == "200", f"{where}: `{command}` -> HTTP {proc.stdout}: {answer}"
    if _sends_body(_argv(command)):
        assert answer["choices"] and answer["usage"]["completion_tokens"] >= 1, answer
