"""train() on a real local Ray cluster: DDP, FSDP, a killed worker, S3 checkpoints, fail-fast input.

Every run uses the tiny preset on a slice of the built-in corpus and 8 optimizer steps or fewer.
The DDP run is the reference: the single-process accumulation run, the FSDP run (which also loses
a worker mid-run) and the registered model are all compared against it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

DATA = {"max_documents": 300, "vocab_size": 512, "block_size": 64}
TRAINING = {"max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 2, "learning_rate": 3e-3,
            "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "seed": 0}


def _config(tmp: Path, name: str, **sections) -> dict:
    config = {"name": name, "registry": str(tmp / "registry"), "storage_path": str(tmp / "runs"),
              "data": dict(DATA), "training": dict(TRAINING), "scaling": {"num_workers": 2, "strategy": "ddp"}}
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    return config


def _losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, workspace):
    from llmstack.train import train

    return train(_config(workspace, "tiny-ddp", scaling={"price_per_worker_hour": 2.5}), progress=False)


def test_ddp_trains_registers_and_writes_metrics(ddp_run, workspace):
    from llmstack.data import prepare_training_data
    from llmstack.config import DataConfig
    from llmstack.registry import Registry

    losses = _losses(ddp_run.history)
    assert [r["step"] for r in ddp_run.history] == list(range(1, 9))
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5  # clearly falling
    assert ddp_run.metrics["eval_loss"] < losses[0]
    assert ddp_run.metrics["perplexity"] == pytest.approx(math.exp(ddp_run.metrics["eval_loss"]))
    # Lineage: tokenizer parent, data fingerprint, config and final metrics in the manifest.
    registry = Registry(str(workspace / "registry"))
    manifest = registry.manifest(ddp_run.ref)
    assert manifest.kind == "model" and manifest.parents == [str(ddp_run.tokenizer_ref)]
    assert registry.manifest(ddp_run.tokenizer_ref).kind == "tokenizer"
    _, packed, _ = prepare_training_data(DataConfig(**DATA))
    assert manifest.data_fingerprint == packed.fingerprint
    assert manifest.config["training"]["max_steps"] == 8
    assert manifest.metrics["eval_loss"] == pytest.approx(ddp_run.metrics["eval_loss"])
    # Cost: wall clock x 2 workers (1 CPU each) x the configured price, in the result and the lineage.
    hours = manifest.metrics["train_time_s"] / 3600 * 2
    assert manifest.metrics["worker_hours"] == pytest.approx(hours, rel=0.02) == manifest.metrics["cpu_hours"]
    assert manifest.metrics["cost_usd"] == pytest.approx(2.5 * hours, rel=0.02) == ddp_run.metrics["cost_usd"]
    assert "model.safetensors" in manifest.files
    # Driver-side files in the run directory.
    run_dir = Path(ddp_run.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "eval_loss" in rows[3]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000004", "checkpoint_000008"]


def test_two_workers_with_accumulation_match_one_big_batch(ddp_run):
    """2 workers x micro 2 x accum 2 on Ray == micro 8 x accum 1 in one plain process."""
    import functools

    from llmstack.config import DataConfig, LoopConfig
    from llmstack.data import prepare_training_data
    from llmstack.train.driver import build_preset_model
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    tokenizer, packed, _ = prepare_training_data(DataConfig(**DATA))
    spec = LoopSpec(model_factory=functools.partial(
        build_preset_model, "tiny", vocab_size=len(tokenizer), max_seq_len=None, seed=0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    session = LocalSession()
    settings = {**TRAINING, "micro_batch_size": 8, "grad_accum_steps": 1, "checkpoint_every": 0}
    run_worker_loop(spec, {"input_ids": packed.train}, None, LoopConfig(**settings), session=session)
    assert _losses(session.records) == pytest.approx(_losses(ddp_run.history), rel=2e-5, abs=2e-5)


@pytest.fixture(scope="module")
def fsdp_s3_run(ray_cluster, workspace, s3_server, ddp_run):
    """FSDP, checkpoints to the S3 server, and worker rank 1 killed (os._exit) after step 5."""
    from llmstack.train import train

    flag = workspace / "fault-fired"
    saved = {k: os.environ.get(k) for k in ("LLMSTACK_FAULT_AT_STEP", "LLMSTACK_FAULT_FLAG")}
    os.environ.update({"LLMSTACK_FAULT_AT_STEP": "5", "LLMSTACK_FAULT_FLAG": str(flag)})
    try:
        result = train(_config(workspace, "tiny-fsdp", **_s3(s3_server), training={"checkpoint_every": 3},
                               scaling={"strategy": "fsdp", "max_failures": 1}), progress=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert flag.exists()  # the worker really died
    return result


def test_worker_lost_right_after_a_checkpoint_resumes_from_that_checkpoint(ray_cluster, workspace):
    """The worker dies one step after checkpoint 4 was reported, before Ray Train's controller (polling every
    2 s) could have registered it unless the loop waited for that: the restart must resume from step 4, not from
    scratch (a loss of one step, not of more than a checkpoint interval)."""
    from llmstack.train import train

    flag = workspace / "fault-after-checkpoint"
    saved = {k: os.environ.get(k) for k in ("LLMSTACK_FAULT_AT_STEP", "LLMSTACK_FAULT_FLAG")}
    os.environ.update({"LLMSTACK_FAULT_AT_STEP": "5", "LLMSTACK_FAULT_FLAG": str(flag)})
    try:
        result = train(_config(workspace, "tiny-lost-after-checkpoint", training={"max_steps": 6, "eval_every": 6},
                               scaling={"num_workers": 1, "max_failures": 1}), progress=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert flag.exists()  # the worker really died
    # Step 5's own report may or may not reach the driver before the worker dies (a busy machine): 1 or 0 lost.
    assert [r["resumed_from_step"] for r in result.recoveries] == [4]
    assert [r["steps_lost"] for r in result.recoveries] in ([0], [1])
    assert [r["step"] for r in result.history] == list(range(1, 7))


def _s3(s3_server) -> dict:
    return {"storage_path": f"s3://{s3_server['bucket']}/runs", "storage_options": s3_server["storage_options"]}


def _s3fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server["endpoint_url"]})


def test_fsdp_on_s3_survives_a_killed_worker_and_matches_ddp(fsdp_s3_run, ddp_run, workspace, s3_server):
    from transformers import AutoModelForCausalLM

    from llmstack.models import load_artifact

    result = fsdp_s3_run
    assert len(result.recoveries) == 1
    recovery = result.recoveries[0]
    assert recovery["resumed_from_step"] == 3 and 0 < recovery["steps_lost"] <= 3  # <= checkpoint interval
    assert [r["step"] for r in result.history] == list(range(1, 9))
    # Sharded training, a restart and replayed steps: still the DDP run's curve.
    assert _losses(result.history) == pytest.approx(_losses(ddp_run.history), rel=1e-4, abs=1e-4)
    # Checkpoints went to S3; the FSDP one is a full safetensors state dict that one process loads.
    bucket_run = f"{s3_server['bucket']}/runs/tiny-fsdp"
    fs = _s3fs(s3_server)
    assert {"checkpoint_000006", "checkpoint_000008", "metrics.jsonl", "loss_curve.png", "model_signature.json"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(bucket_run)}
    assert result.checkpoint_path == f"s3://{bucket_run}/checkpoint_000008"
    local = workspace / "fsdp-final"
    fs.get(f"{bucket_run}/checkpoint_000008/", str(local), recursive=True)
    assert {"model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "rng_rank1.safetensors",
            "state.json", "config.json"} <= {p.name for p in local.iterdir()}
    checkpoint = AutoModelForCausalLM.from_pretrained(str(local), use_safetensors=True)
    registered = load_artifact(str(result.ref), registry=_registry(workspace)).model
    for (name, a), (_, b) in zip(checkpoint.state_dict().items(), registered.state_dict().items()):
        assert a.shape == b.shape and bool((a == b).all()), name


def _registry(workspace: Path):
    from llmstack.registry import Registry

    return Registry(str(workspace / "registry"))


def test_same_run_name_resumes_from_latest_checkpoint(fsdp_s3_run, workspace, s3_server):
    """A rerun of the S3 FSDP run, with 2 more steps and only one worker: full-state checkpoints do not
    care how many workers wrote them."""
    from llmstack.train import train

    result = train(_config(workspace, "tiny-fsdp", **_s3(s3_server), training={"max_steps": 10},
                           scaling={"strategy": "fsdp", "num_workers": 1}), progress=False)
    assert fsdp_s3_run.resumed_from_step is None and result.resumed_from_step == 8
    assert [r["step"] for r in result.history] == list(range(1, 11))
    assert result.history[:8] == fsdp_s3_run.history  # steps 1-8 were not redone
    assert result.metrics["tokens"] > fsdp_s3_run.metrics["tokens"]
    assert result.checkpoint_path.endswith("tiny-fsdp/checkpoint_000010")


@pytest.mark.parametrize("case, error, expected", [
    ("workers", "ResourceError", "scaling.num_workers=64 needs 64 CPUs"),
    ("positions", "ConfigError", "data.block_size: 512 tokens exceed the model's 256 positions"),
    ("batch", "ConfigError", "blocks per step, but the training set has only"),
    ("storage", "ConfigError", "cannot write checkpoints to s3://nowhere/runs"),
    ("other-model", "ConfigError", "holds checkpoints of a different model"),
])
def test_bad_input_fails_before_workers_start(ray_cluster, workspace, ddp_run, case, error, expected):
    import llmstack.errors
    from llmstack.train import train

    bad = {
        "workers": {"scaling": {"num_workers": 64}},
        "positions": {"data": {"block_size": 512}},
        "batch": {"training": {"micro_batch_size": 100_000}},
        "storage": {"storage_path": "s3://nowhere/runs",
                    "storage_options": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}},
        "other-model": {"name": "tiny-ddp", "model": {"preset": "small"}},  # the DDP run's directory
    }[case]
    before = sorted(p.name for p in (workspace / "runs").glob("*/checkpoint_0*"))
    started = time.perf_counter()
    with pytest.raises(getattr(llmstack.errors, error)) as info:
        train(_config(workspace, bad.pop("name", f"bad-{case}"), **bad), progress=False)
    assert expected in str(info.value)
    assert time.perf_counter() - started < 60
    assert sorted(p.name for p in (workspace / "runs").glob("*/checkpoint_0*")) == before  # nothing trained


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
