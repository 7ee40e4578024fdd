"""The per-worker loop in one plain process (no Ray): accumulation, resume, precision, checkpoints."""

from __future__ import annotations

import functools
import json
import time

import pytest

torch = pytest.importorskip("torch")

from llmstack.config import LoopConfig  # noqa: E402
from llmstack.train.loop import LocalSession, LoopSpec, causal_lm_loss, run_worker_loop  # noqa: E402
from llmstack.train.driver import build_preset_model  # noqa: E402

VOCAB = 256


def _data(n: int, seed: int) -> dict:
    # Learnable, not uniform: a 16-token alphabet in repeated motifs, so the loss falls within steps.
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, 16, (n, 8), generator=g)
    return {"input_ids": motifs.repeat(1, 4)}  # [n, 32]


TRAIN, EVAL = _data(48, 0), _data(8, 1)
SPEC = LoopSpec(model_factory=functools.partial(build_preset_model, "tiny", vocab_size=VOCAB, max_seq_len=64, seed=0))


def _run(session: LocalSession | None = None, **overrides) -> tuple[dict, LocalSession]:
    settings = dict(max_steps=4, micro_batch_size=8, grad_accum_steps=1, warmup_steps=1, eval_every=2,
                    eval_batches=1, checkpoint_every=0, learning_rate=3e-3)
    settings.update(overrides)
    session = session or LocalSession()
    final = run_worker_loop(SPEC, TRAIN, EVAL, LoopConfig(**settings), session=session)
    return final, session


def _losses(session: LocalSession) -> list[float]:
    return [r["loss"] for r in session.records if "loss" in r]


def test_accumulation_equals_bigger_batch():
    _, big = _run(micro_batch_size=8, grad_accum_steps=1)
    _, accumulated = _run(micro_batch_size=2, grad_accum_steps=4)
    assert _losses(accumulated) == pytest.approx(_losses(big), rel=1e-5, abs=1e-5)
    assert [r["tokens"] for r in accumulated.records] == [r["tokens"] for r in big.records]
    assert _losses(big)[-1] < _losses(big)[0]  # and it learns


def test_masked_labels_normalised_by_global_token_count():
    # With a prompt mask of varying length the per-token mean must still match across splits.
    labels = TRAIN["input_ids"].clone()
    for i in range(len(labels)):
        labels[i, : 4 + i % 9] = -100
    data = {"input_ids": TRAIN["input_ids"], "labels": labels}
    config = dict(max_steps=2, warmup_steps=1, eval_every=10, checkpoint_every=0, eval_batches=1)
    a, b = LocalSession(), LocalSession()
    run_worker_loop(SPEC, data, None, LoopConfig(micro_batch_size=8, grad_accum_steps=1, **config), session=a)
    run_worker_loop(SPEC, data, None, LoopConfig(micro_batch_size=2, grad_accum_steps=4, **config), session=b)
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)


class _Crash(Exception):
    pass


class _CrashAfterCheckpoint(LocalSession):
    def __init__(self, root, *, at_step: int) -> None:
        super().__init__(root)
        self.at_step = at_step

    def report(self, metrics, checkpoint_dir, name):
        super().report(metrics, checkpoint_dir, name)
        if metrics["step"] == self.at_step:
            raise _Crash


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    _, straight = _run(max_steps=6)
    first = _CrashAfterCheckpoint(tmp_path / "ckpts", at_step=3)
    with pytest.raises(_Crash):  # dies right after the step-3 checkpoint
        _run(first, max_steps=6, checkpoint_every=3)
    second = LocalSession(tmp_path / "ckpts")
    final, _ = _run(second, max_steps=6, checkpoint_every=3)
    (event,) = second.events
    assert event["event"] == "started" and event["step"] == 3 and event["workers"] == 1
    assert event["time"] <= time.time()  # the worker group's start: worker-seconds count from it
    # Same data order, optimizer moments, LR schedule and RNG: the curves continue exactly.
    assert _losses(first) + _losses(second) == pytest.approx(_losses(straight), rel=1e-6)
    assert final["step"] == 6
    # Checkpoint contents: safetensors + JSON only, loadable in one process as an HF model.
    directory = tmp_path / "ckpts" / "checkpoint_000006"
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_rank0.safetensors", "scheduler.json", "state.json"]
    state = json.loads((directory / "state.json").read_text())
    assert state["step"] == 6 and state["metrics"]["loss"] == pytest.approx(final["loss"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), use_safetensors=True)
    with torch.no_grad():
        loss = causal_lm_loss(model, EVAL) / (EVAL["input_ids"].numel() - len(EVAL["input_ids"]))
    assert float(loss) == pytest.approx(final["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("overrides", [{"precision": "bf16"}, {"activation_checkpointing": True}, {"grad_clip": 0.0}])
def test_variants_train(overrides):
    final, session = _run(max_steps=5, **overrides)
    losses = _losses(session)
    assert losses[-1] < losses[0]
    assert final["eval_loss"] < losses[0] and final["perplexity"] == pytest.approx(torch.tensor(final["eval_loss"]).exp().item())
    if "activation_checkpointing" in overrides:
        _, plain = _run(max_steps=5)  # recomputation changes memory, not the math
        assert losses == pytest.approx(_losses(plain), rel=1e-5)


def test_trainable_selection_freezes_the_rest(tmp_path):
    spec = LoopSpec(model_factory=SPEC.model_factory, trainable=lambda name, p: "norm" in name,
                    checkpoint_trainable_only=True)
    session = LocalSession(tmp_path)
    run_worker_loop(spec, TRAIN, None, LoopConfig(max_steps=2, micro_batch_size=8, warmup_steps=0,
                                                      checkpoint_every=0, eval_every=10), session=session)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint_000002" / "model.safetensors"))
    initial = SPEC.model_factory().state_dict()
    assert saved and all("norm" in k for k in saved)  # only the trainable tensors are stored
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # and they moved
    assert "config.json" not in {p.name for p in (tmp_path / "checkpoint_000002").iterdir()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_equals_cross_entropy_of_sliced_logits(precision):
    # The loss shifts labels instead of slicing logits; value and gradients must be those of the slice.
    from llmstack.train.loop import autocast

    labels = TRAIN["input_ids"][:4].clone()
    labels[:, :5] = -100  # a masked prompt
    batch = {"input_ids": TRAIN["input_ids"][:4], "labels": labels}
    model = SPEC.model_factory()
    with autocast(precision, torch.device("cpu")):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast(precision, torch.device("cpu")):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    reference.backward()
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_optimizer_is_fused_and_updates_like_the_reference_adamw():
    from llmstack.train.loop import build_optimizer

    training = LoopConfig(learning_rate=1e-2, weight_decay=0.1)
    fused_model, reference_model = SPEC.model_factory(), SPEC.model_factory()
    fused = build_optimizer(fused_model, training)
    assert fused.defaults["fused"] is True
    decay = [p for p in reference_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference_model.parameters() if p.ndim < 2]
    reference = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(3):  # the same gradients into both (from the reference), so only the update differs
        batch = {"input_ids": TRAIN["input_ids"][step * 8:(step + 1) * 8]}
        causal_lm_loss(reference_model, batch).backward()
        for a, b in zip(fused_model.parameters(), reference_model.parameters()):
            a.grad = b.grad.clone()
        fused.step()
        reference.step()
        fused.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        for (name, a), b in zip(fused_model.named_parameters(), reference_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
    assert any(not torch.equal(a, b) for a, b in zip(fused_model.parameters(), SPEC.model_factory().parameters()))


def test_emulated_device_time_is_inside_each_step_and_scales_with_micro_batches(monkeypatch):
    # The fleet benchmark's hook: a sleep per micro-batch that counts as step time (busy worker-seconds). A
    # tiny step takes well under a second here even on a busy machine; four micro-batches take four sleeps.
    monkeypatch.setenv("LLMSTACK_EMULATED_DEVICE_S", "1.0")
    _, one = _run(max_steps=1, micro_batch_size=8, grad_accum_steps=1, eval_every=10)
    _, four = _run(max_steps=1, micro_batch_size=2, grad_accum_steps=4, eval_every=10)
    assert len(one.records) == len(four.records) == 1
    assert one.records[0]["step_time_s"] >= 1.0
    assert four.records[0]["step_time_s"] >= 4.0
    assert _losses(four) == pytest.approx(_losses(one), rel=1e-5, abs=1e-5)  # timing only, not the maths
