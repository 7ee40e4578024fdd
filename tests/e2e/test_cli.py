"""The CLI as a user meets it: a subprocess, one-line errors, non-zero exits, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


LLMSTACK = str(Path(sys.executable).with_name("llmstack"))


def run(*args: str, registry: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if registry is not None:
        env["LLMSTACK_REGISTRY"] = str(registry)
    proc = subprocess.run([LLMSTACK, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llmstack: error:")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_and_module_entry_point():
    assert "registry" in run("--help", check=True).stdout
    proc = subprocess.run([sys.executable, "-m", "llmstack", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_unknown_verb_and_missing_args_are_one_line():
    assert_one_line_error(run("bogus"), "invalid choice")
    assert_one_line_error(run("registry"), "required")


def test_quickstart_refuses_an_unknown_method_before_any_stage(tmp_path):
    proc = run("quickstart", "--method", "int3", "--workdir", str(tmp_path / "qs"), registry=tmp_path / "reg")
    assert_one_line_error(proc, "method: unknown quantization method 'int3'", "int8-weight-only", "smoothquant")
    assert not (tmp_path / "reg").exists()  # nothing was built


def test_config_errors_list_every_problem(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("training:\n  micro_batch_size: 0\nscaling:\n  strategy: zero3\n")
    proc = run("train", "--config", str(config), "bogus.key=1")
    assert_one_line_error(proc, "3 config problems", "training.micro_batch_size: must be >= 1",
                          "scaling.strategy: must be one of", "bogus: unknown key")
    assert_one_line_error(run("train", "--config", str(tmp_path / "nope.yaml")), "config file not found")


def test_registry_commands(tmp_path):
    registry = tmp_path / "registry"
    assert "no versions" in run("registry", "list", registry=registry, check=True).stdout
    assert_one_line_error(run("registry", "show", "ghost@v1", registry=registry), "ghost")
    assert_one_line_error(run("registry", "show", "../etc@v1", registry=registry))

    from llmstack.registry import Registry

    source = tmp_path / "files"
    source.mkdir()
    (source / "weights.safetensors").write_bytes(b"\0" * 64)
    ref = Registry(str(registry)).register("demo", source, kind="model")
    listed = run("registry", "list", registry=registry, check=True).stdout
    assert str(ref) in listed and "model" in listed
    shown = run("registry", "show", str(ref), registry=registry, check=True).stdout
    assert f"{ref}  (model)" in shown and "weights.safetensors" in shown
    assert "ok" in run("registry", "verify", str(ref), registry=registry, check=True).stdout
    run("registry", "alias", "demo", "production", "1", registry=registry, check=True)
    listed = run("registry", "list", registry=registry, check=True).stdout
    assert listed.splitlines()[1].split()[-1] == "production"
    history = run("registry", "history", "demo", registry=registry, check=True).stdout
    assert "production" in history and "v1" in history

    stored = next(p for p in registry.rglob("weights.safetensors"))
    stored.write_bytes(b"\1" * 64)
    assert_one_line_error(run("registry", "verify", str(ref), registry=registry), "weights.safetensors")


def test_unreachable_registry_is_one_line(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.run([LLMSTACK, "--registry", "s3://no-such-bucket/registry", "registry", "list"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert_one_line_error(proc, "s3://no-such-bucket/registry")
