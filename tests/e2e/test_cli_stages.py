"""Each stage's CLI verb as a user runs it: real subprocesses against a registry on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LLMSTACK = str(Path(sys.executable).with_name("llmstack"))


def run(registry: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMSTACK_REGISTRY": str(registry), "OMP_NUM_THREADS": "1"}
    return subprocess.run([LLMSTACK, *args], capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("llmstack: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def registry_with_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmstack.serve._testing import make_registry

    path = tmp_path_factory.mktemp("cli-stages") / "registry"
    make_registry(str(path), name="tiny-lm", adapters=0)  # tiny-lm@v1, aliased production
    return path


def test_quantize_validate_promote_history_rollback(registry_with_model: Path):
    reg = registry_with_model
    proc = run(reg, "quantize", "tiny-lm@v1", "method=w8a8", "name=tiny-lm", "evaluation.samples=2",
               "evaluation.speed_prompt_tokens=8", "evaluation.speed_new_tokens=2", "evaluation.speed_repeats=1",
               "calibration.samples=4")
    assert proc.returncode == 0, proc.stderr
    assert "registered tiny-lm@v2" in proc.stdout and "perplexity" in proc.stdout

    proc = run(reg, "validate", "tiny-lm@v2", "baseline=tiny-lm@production", "--json")
    assert proc.returncode in (0, 1), proc.stderr  # 1 = the gate failed, still a clean report
    assert '"passed"' in proc.stdout

    one_line_error(run(reg, "registry", "promote", "tiny-lm@v2", "--force"), "is now `llmstack promote REF")
    proc = run(reg, "promote", "tiny-lm@v2", "--force", "--reason", "cli test")
    assert proc.returncode == 0, proc.stderr
    history = run(reg, "registry", "history", "tiny-lm").stdout
    assert "v2" in history and "cli test" in history
    proc = run(reg, "rollback", "tiny-lm", "--reason", "back")
    assert proc.returncode == 0, proc.stderr
    listed = run(reg, "registry", "list", "tiny-lm").stdout
    v1_line = next(line for line in listed.splitlines() if line.startswith("tiny-lm@v1"))
    assert "production" in v1_line


def test_stage_verbs_reject_bad_input_in_one_line(registry_with_model: Path):
    reg = registry_with_model
    one_line_error(run(reg, "quantize", "tiny-lm@v1", "method=int3"), "unknown method 'int3'", "known:")
    one_line_error(run(reg, "quantize", "ghost@v1", "method=w8a8"), "ghost")
    one_line_error(run(reg, "quantize", "tiny-lm@v1", "--method", "w8a8"), "e.g. method=w8a8")
    one_line_error(run(reg, "finetune", "tiny-lm@v1", "lora.rank=0"), "lora.rank: must be >= 1")
    one_line_error(run(reg, "finetune", "tiny-lm@v1", "lora.method=adapterz"), "unknown method 'adapterz'")
    one_line_error(run(reg, "finetune", "lora.rank=4"), "base: no base model given")
    one_line_error(run(reg, "distill", "tiny-lm@v1", "temperature=-1"), "temperature")
    one_line_error(run(reg, "sweep", "tiny-lm@v1", "ranks=[]"), "ranks")
    one_line_error(run(reg, "validate", "tiny-lm@v1", "baseline=nothing@v9"), "nothing")
    one_line_error(run(reg, "validate", "tiny-lm@v1"), "baseline: not given")
    one_line_error(run(reg, "rollback"), "rollback needs a registry NAME")
