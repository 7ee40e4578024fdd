"""finetune_lora(), distill() and sweep() end to end on real local Ray Train workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmstack.finetune import distill, finetune_lora, sweep
from llmstack.models import load_artifact

pytestmark = pytest.mark.ray
QA = "builtin:stdlib-qa"


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("What does `json.dumps` do?")["input_ids"][:16]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_under_fsdp_saves_every_ranks_shard_and_merges(ft_base, small_config) -> None:
    from safetensors.torch import load_file

    registry = ft_base["registry"]
    cfg = small_config("lora-fsdp", ft_base["root"], workers=2, strategy="fsdp", merge=True)
    result = finetune_lora(cfg, base=str(ft_base["ref"]), data={"source": QA}, registry=registry, progress=False)

    manifest = registry.manifest(result.ref)
    assert manifest.kind == "adapter" and manifest.parents == [str(ft_base["ref"])]
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    assert 0 < result.metrics["trainable_fraction"] < 0.1
    # FSDP2 shards dim 0 of every tensor over the 2 ranks; the checkpoint and the adapter hold full tensors.
    checkpoint = load_file(str(Path(result.checkpoint_path) / "model.safetensors"))
    adapter = load_file(str(registry.fetch(result.ref) / "adapter_model.safetensors"))
    assert len(checkpoint) == len(adapter) == 2 * 7 * 4
    for name, tensor in adapter.items():
        rank_dim = 0 if "lora_A" in name else 1
        assert tensor.shape[rank_dim] == 4, name  # the full rank, not half of it
    q_a = next(t for n, t in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in n)
    assert tuple(q_a.shape) == (4, 128)

    merged = registry.manifest(result.merged_ref)
    assert merged.kind == "model" and merged.parents == [str(result.ref), str(ft_base["ref"])]
    loaded = load_artifact(result.ref, registry=registry)
    with_adapter, tokenizer = loaded.model, loaded.tokenizer
    merged_model = load_artifact(str(result.merged_ref), registry=registry).model
    torch.testing.assert_close(_logits(merged_model, tokenizer), _logits(with_adapter, tokenizer),
                               rtol=1e-4, atol=1e-4)


def test_qlora_through_ray_train_and_merge(ft_base, small_config) -> None:
    registry = ft_base["registry"]
    result = finetune_lora(small_config("qlora", ft_base["root"], method="qlora", merge=True),
                           base=str(ft_base["ref"]), data={"source": QA}, registry=registry, progress=False)
    assert registry.manifest(result.ref).kind == "adapter"
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    merged = registry.manifest(result.merged_ref)
    assert merged.extra["merge"].startswith("adapter folded into the dequantized NF4 base")
    model = load_artifact(str(result.merged_ref), registry=registry).model
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())


def _mlflow_runs(uri: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=str(uri))
    runs = client.search_runs([client.get_experiment_by_name("llmstack").experiment_id])
    return client, {run.info.run_name: run for run in runs}


def test_distill_registers_the_student_with_its_teacher(ft_base, small_config) -> None:
    from llmstack.train.tracking import REGISTRY_VERSION_TAG

    registry = ft_base["registry"]
    cfg = small_config("student", ft_base["root"])
    cfg.pop("lora")
    mlruns = ft_base["root"] / "mlruns-distill"
    result = distill(cfg, teacher=str(ft_base["ref"]), student="preset:tiny", data={"source": QA},
                     temperature=2.0, alpha=0.5, registry=registry, progress=False,
                     tracking={"mlflow_uri": str(mlruns)})
    manifest = registry.manifest(result.ref)
    assert manifest.kind == "model" and manifest.parents == [str(ft_base["ref"])]
    assert manifest.extra["distilled_from"] == str(ft_base["ref"])
    assert manifest.config["temperature"] == 2.0 and manifest.config["alpha"] == 0.5
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    # The same run in MLflow, as train and finetune log theirs.
    client, runs = _mlflow_runs(mlruns)
    run = runs["student"]
    assert run.info.status == "FINISHED" and run.data.tags["llmstack.kind"] == "distill"
    assert run.data.tags[REGISTRY_VERSION_TAG] == str(result.ref) and run.data.params["temperature"] == "2.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.metrics["final.eval_loss"] == pytest.approx(result.metrics["eval_loss"])


def test_two_trial_sweep_stops_the_weak_trial_and_registers_the_best(ft_base, small_config) -> None:
    registry = ft_base["registry"]
    finetune = small_config("unused", ft_base["root"])
    finetune["training"]["eval_every"] = 2  # ASHA rungs at steps 2 and 4
    mlruns = ft_base["root"] / "mlruns-sweep"
    finetune["tracking"] = {"mlflow_uri": str(mlruns)}
    result = sweep({"name": "swept", "search": "grid", "learning_rates": [3e-3, 1e-4], "ranks": [4], "alphas": [8.0],
                    "grace_period": 1, "reduction_factor": 2, "finetune": finetune},
                   base=str(ft_base["ref"]), finetune={"data": {"source": QA}}, registry=registry, progress=False)
    assert len(result.trials) == 2
    strong, weak = sorted(result.trials, key=lambda t: -t["learning_rate"])
    assert strong["finished"] and strong["step"] == 4
    assert weak["stopped_early"] and weak["step"] == 2  # trials run one at a time; the weak one loses at rung 2
    assert result.best["learning_rate"] == 3e-3
    manifest = registry.manifest(result.ref)
    assert manifest.kind == "adapter" and manifest.parents == [str(ft_base["ref"])]
    assert len(manifest.extra["sweep"]["trials"]) == 2
    model = load_artifact(result.ref, registry=registry).model
    assert model is not None
    # MLflow: the sweep's run, and one nested run per trial with its per-step metrics and how it ended.
    from llmstack.train.tracking import PARENT_RUN_TAG, REGISTRY_VERSION_TAG

    client, runs = _mlflow_runs(mlruns)
    parent = runs.pop("swept")
    assert parent.info.status == "FINISHED" and parent.data.tags[REGISTRY_VERSION_TAG] == str(result.ref)
    assert parent.data.metrics["final.best_learning_rate"] == 3e-3
    assert len(runs) == 2 and all(r.data.tags[PARENT_RUN_TAG] == parent.info.run_id for r in runs.values())
    by_rate = {float(r.data.params["training.learning_rate"]): r for r in runs.values()}
    assert by_rate[3e-3].data.tags["llmstack.trial_outcome"] == "finished"
    assert [m.step for m in client.get_metric_history(by_rate[3e-3].info.run_id, "loss")] == [1, 2, 3, 4]
    assert by_rate[1e-4].data.tags["llmstack.trial_outcome"] == "stopped_early"
    assert by_rate[1e-4].info.status != "RUNNING"
