"""Fail-fast checks and storage resolution on the driver (no Ray, no workers)."""

from __future__ import annotations

import json
import os
import time

import pytest

from llmstack.config import WorkersConfig, LoopConfig
from llmstack.errors import ConfigError
from llmstack.train.driver import check_batch, check_signature, check_training, default_storage_path
from llmstack.train.storage import probe, resolve_storage


def test_batch_larger_than_dataset_names_the_knobs():
    check_batch(LoopConfig(micro_batch_size=4, grad_accum_steps=2), WorkersConfig(num_workers=2), num_blocks=16)
    with pytest.raises(ConfigError) as info:
        check_batch(LoopConfig(micro_batch_size=4, grad_accum_steps=2), WorkersConfig(num_workers=2),
                    num_blocks=15)
    message = str(info.value)
    assert "16 blocks per step" in message and "only 15 blocks" in message and "micro_batch_size" in message


def test_fp16_needs_cuda():
    check_training(LoopConfig(precision="bf16"), WorkersConfig(use_gpu=False))
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        check_training(LoopConfig(precision="fp16"), WorkersConfig(use_gpu=False))


def test_signature_recorded_then_compared(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    run = str(tmp_path / "run")
    os.makedirs(run)
    check_signature(fs, run, {"hidden_size": 128, "vocab_size": 512})
    assert json.loads((tmp_path / "run" / "model_signature.json").read_text())["hidden_size"] == 128
    check_signature(fs, run, {"hidden_size": 128, "vocab_size": 512})  # same model: fine
    with pytest.raises(ConfigError) as info:
        check_signature(fs, run, {"hidden_size": 256, "vocab_size": 512})
    assert "different model" in str(info.value) and "hidden_size: 128 (stored) vs 256 (now)" in str(info.value)
    assert "name=" in str(info.value)


def test_default_storage_next_to_registry(tmp_path):
    class Reg:
        url = str(tmp_path / "reg")

    assert default_storage_path(Reg) == str(tmp_path / "runs")
    Reg.url = "s3://bucket/team/registry"
    assert default_storage_path(Reg) == "s3://bucket/team/runs"
    Reg.url = "memory://scratch"
    assert default_storage_path(Reg).endswith(".llmstack/runs")


def test_resolve_s3_builds_arrow_fs_with_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage = resolve_storage("s3://bucket/runs/", {"endpoint_url": "http://127.0.0.1:9"})
    assert (storage.protocol, storage.path, storage.url) == ("s3", "bucket/runs", "s3://bucket/runs")
    path, arrow = storage.for_ray()
    assert path == "bucket/runs" and type(arrow).__name__ == "S3FileSystem"
    assert storage.options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    local = resolve_storage("file:///tmp/x/../y")
    assert local.is_local and local.path == "/tmp/y" and local.for_ray() == ("/tmp/y", None)


def test_unwritable_local_storage_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write checkpoints to"):
        probe(resolve_storage(str(blocker / "runs")), "run")


def test_unreachable_s3_fails_within_seconds():

    storage = resolve_storage("s3://bucket/runs", {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                   "key": "k", "secret": "s"})
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        probe(storage, "run")
    assert time.perf_counter() - started < 30
    assert "s3://bucket/runs" in str(info.value) and "endpoint" in str(info.value)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_llmstack_train_is_callable_even_after_the_package_import(tmp_path):
    import llmstack
    import llmstack.train  # binds llmstack.train to the package module

    with pytest.raises(ConfigError, match="data.block_size: 4096 tokens exceed the model's 256 positions"):
        llmstack.train({"data": {"block_size": 4096}}, registry=str(tmp_path / "registry"))


def test_run_cost_prices_worker_hours_only_when_a_price_is_given():
    from llmstack.train.driver import run_cost

    assert run_cost(1800, WorkersConfig(num_workers=4, cpus_per_worker=2)) == {"worker_hours": 2.0, "cpu_hours": 4.0}
    priced = run_cost(1800, WorkersConfig(num_workers=4, use_gpu=True, price_per_worker_hour=3.0))
    assert priced == {"worker_hours": 2.0, "cpu_hours": 2.0, "gpu_hours": 2.0, "cost_usd": 6.0}


def test_a_non_positive_price_is_a_config_error():
    from llmstack.config import TrainConfig, load_config

    with pytest.raises(ConfigError, match="scaling.price_per_worker_hour: must be > 0"):
        load_config(TrainConfig, {"scaling": {"price_per_worker_hour": 0}})
