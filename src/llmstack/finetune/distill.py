"""``distill()``: train a smaller student on a teacher's temperature-softened distributions.

Loss per response token (Hinton et al., 2015)::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)

It runs on the same Ray Train loop as train() and finetune_lora(): :class:`DistillLoss` is the
loop's ``loss_fn``, loading the frozen teacher once per worker. In eval mode it returns the plain
hard-label loss, so ``eval_loss`` is the student's held-out answer loss, comparable with a student
trained without a teacher (``alpha=0``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack._verbs import Overrides, read_settings
from llmstack.config import to_dict
from llmstack.errors import ConfigError
from llmstack.finetune.configs import DistillConfig
from llmstack.finetune.lora import (check_positions, default_storage, ensure_base_ref, evaluate_in_process,
                                    load_trainable, open_registry, summarize)

if TYPE_CHECKING:
    from llmstack.registry import ArtifactRef, Registry

IGNORE_INDEX = -100


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        ref: the registered student (kind ``model``; parents: the teacher, and the student's
            starting model when it was not a fresh preset).
        teacher: the teacher version.
        metrics: final ``loss`` (the distillation loss), ``eval_loss`` (hard-label held-out loss),
            ``eval_loss_before``, ``teacher_eval_loss``, parameter counts, time.
        history: per-step metric records.
    """

    ref: ArtifactRef
    teacher: ArtifactRef
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str = ""
    checkpoint_path: str = ""

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        return f"{self.ref} (student of {self.teacher}; {shown})"


@dataclass
class DistillLoss:
    """The loop's ``loss_fn`` for distillation: summed over response tokens, like ``causal_lm_loss``.

    Picklable: the teacher is loaded lazily on the worker (from the registry) and cached there.
    """

    registry: Any
    teacher: str  # concrete teacher ref
    temperature: float
    alpha: float
    # Tokens compared by the soft loss: the shared tokenizer's size when one model pads its embedding
    # matrix beyond it (Qwen2's is a multiple of 64...); None: every logit (equal vocabularies).
    shared_vocab: int | None = None
    _model: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None  # never ship a loaded teacher
        return state

    def teacher_model(self, device: Any) -> Any:
        if self._model is None:
            from llmstack.models import load_artifact

            model = load_artifact(self.teacher, registry=self.registry, with_tokenizer=False).model
            for param in model.parameters():
                param.requires_grad_(False)
            self._model = model.eval().to(device)
        return self._model

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch
        import torch.nn.functional as F

        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels", input_ids)[:, 1:]  # [B, T-1]
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        hard = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        if not model.training or self.alpha == 0.0:
            return hard  # eval: the hard-label loss, comparable across students
        with torch.no_grad():
            teacher = self.teacher_model(input_ids.device)
            teacher_logits = teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        keep = labels != IGNORE_INDEX  # [B, T-1]: response positions only
        if self.shared_vocab is not None:
            logits, teacher_logits = logits[..., :self.shared_vocab], teacher_logits[..., :self.shared_vocab]
        temperature = self.temperature
        student_logp = F.log_softmax(logits[keep] / temperature, dim=-1)  # [N, V]
        teacher_logp = F.log_softmax(teacher_logits[keep] / temperature, dim=-1)  # [N, V]
        soft = (teacher_logp.exp() * (teacher_logp - student_logp)).sum() * temperature ** 2
        return self.alpha * soft + (1.0 - self.alpha) * hard


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any, *, teacher: str, student: str) -> None:
    """Refuse a student whose tokenizer maps text to other ids than the teacher's.

    Distillation compares the two next-token distributions id by id, so an id must mean the same token
    in both; equal vocabulary sizes are not enough (two BPEs of one size split text differently).

    Raises:
        ConfigError: the vocabularies differ; the message gives both sizes and a few differing tokens.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(token for token in set(teacher_vocab) | set(student_vocab)
                       if teacher_vocab.get(token) != student_vocab.get(token))
    examples = ", ".join(f"{token!r}: teacher {teacher_vocab.get(token)} / student {student_vocab.get(token)}"
                         for token in differing[:3])
    raise ConfigError(
        f"student: the tokenizer of {student} ({len(student_vocab)} tokens) is not the teacher {teacher}'s "
        f"({len(teacher_vocab)} tokens): {len(differing)} tokens differ ({examples}); distillation compares the "
        "two models' distributions token id by token id, so pick a student that shares the teacher's tokenizer "
        "(the same model family) or start from student=preset:<name>")


def build_student(spec: dict[str, Any]) -> Any:
    """The student on a worker: a seeded fresh preset or a loaded model, fully trainable."""
    if spec["preset"] is not None:
        from llmstack.train.driver import build_preset_model

        model = build_preset_model(spec["preset"], vocab_size=spec["vocab_size"], max_seq_len=spec["max_seq_len"],
                                   seed=spec["seed"], **spec["special"])
    else:
        from llmstack.models import load_artifact

        # trained: float32 master weights whatever the source's stored dtype (the teacher stays as stored)
        model = load_artifact(spec["source"], registry=spec["registry"], dtype="float32", with_tokenizer=False).model
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def distill(config: DistillConfig | Mapping[str, Any] | str | Path | None = None, *,
            registry: Registry | str | None = None, overrides: Overrides = (), progress: bool = True,
            **settings: Any) -> DistillResult:
    """Distil the model ``teacher`` into ``student`` on instruction data and register the student.

    Args:
        config: a :class:`DistillConfig`, a mapping of its fields, or a YAML file path (None: defaults).
        registry: a Registry or URL (default ``config.registry``, then ``$LLMSTACK_REGISTRY``).
        overrides: ``key.path=value`` strings (or a mapping of key paths to values) applied on top of ``config``.
        progress: show the progress bar.
        **settings: top-level config keys as values, applied last: ``teacher`` (the model: registry ref, local
            HF directory or hub id), ``student`` (``preset:<name>`` for a fresh preset sharing the teacher's
            tokenizer, or a model with the teacher's vocabulary), ``temperature`` (T > 0), ``alpha`` (weight
            of the soft loss in [0, 1]; 0 trains on hard labels only, the no-teacher baseline).

    Returns:
        A :class:`DistillResult`; ``.ref`` is the student, registered (kind ``model``) with the teacher in its
        lineage.

    Raises:
        ConfigError: no teacher, a student whose tokenizer differs from the teacher's, bad T/alpha.

    Example:
        >>> from llmstack.finetune import distill
        >>> r = distill(teacher="tiny-lm@v1", student="preset:tiny", temperature=2.0, alpha=0.5)  # doctest: +SKIP
    """
    from llmstack.finetune.data import instruction_tensors
    from llmstack.finetune.methods import count_trainable
    from llmstack.models import PRESETS, load_artifact, preset_config
    from llmstack.train import run_training
    from llmstack.train.checkpoint import model_signature
    from llmstack.train.loop import LoopSpec

    cfg, _ = read_settings("distill", DistillConfig, config, overrides, settings)
    if not cfg.teacher:
        raise ConfigError("teacher: no teacher model given; set teacher (distill(teacher=...), `llmstack distill "
                          "MODEL` or teacher: in the config)")
    reg = open_registry(registry, cfg.registry)
    teacher_ref = ensure_base_ref(cfg.teacher, reg, name=f"{cfg.name}-teacher")
    teacher = load_artifact(str(teacher_ref), registry=reg)
    teacher_model, tokenizer = teacher.model, teacher.tokenizer
    check_positions(teacher_model.config, cfg.data.block_size, f"teacher {teacher_ref}")
    teacher_vocab = teacher_model.config.vocab_size
    teacher_params = sum(p.numel() for p in teacher_model.parameters())
    del teacher_model

    parents = [str(teacher_ref)]
    shared_vocab: int | None = None
    if cfg.student.startswith("preset:"):
        preset = cfg.student.removeprefix("preset:")
        if preset not in PRESETS:
            raise ConfigError(f"student: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        student_spec = {"preset": preset, "vocab_size": teacher_vocab, "max_seq_len": None,
                        "seed": cfg.training.seed, "special": special}
        student_config = preset_config(preset, vocab_size=teacher_vocab, **special)
    else:
        student_ref = ensure_base_ref(cfg.student, reg, name=f"{cfg.name}-student-init")
        student = load_artifact(str(student_ref), registry=reg)
        student_model, student_tokenizer = student.model, student.tokenizer
        student_config = student_model.config
        del student_model
        check_same_tokenizer(tokenizer, student_tokenizer, teacher=str(teacher_ref), student=str(student_ref))
        if student_config.vocab_size != teacher_vocab:
            # One tokenizer, embedding matrices padded differently: compare the tokens both models know.
            shared_vocab = min(student_config.vocab_size, teacher_vocab)
            if shared_vocab < len(tokenizer):
                raise ConfigError(
                    f"student: {student_ref} embeds {student_config.vocab_size} tokens and the teacher {teacher_ref} "
                    f"{teacher_vocab}, but their shared tokenizer has {len(tokenizer)}; a model must embed "
                    "every token of its tokenizer")
        student_spec = {"preset": None, "source": str(student_ref), "registry": reg}
        parents.append(str(student_ref))
    check_positions(student_config, cfg.data.block_size, f"student {cfg.student}")

    tensors = instruction_tensors(cfg.data.source, tokenizer, max_length=cfg.data.block_size, packing=cfg.packing,
                                  max_rows=cfg.data.max_documents, storage_options=cfg.data.storage_options or None,
                                  columns=cfg.data.columns or None, chat_template=cfg.data.chat_template,
                                  train_on_inputs=cfg.data.train_on_inputs)
    factory = functools.partial(build_student, student_spec)
    loss_fn = DistillLoss(registry=reg, teacher=str(teacher_ref), temperature=cfg.temperature, alpha=cfg.alpha,
                          shared_vocab=shared_vocab)
    start = factory()
    trainable, total = count_trainable(start)
    before = evaluate_in_process(factory, tensors.eval, cfg.training, model=start)
    del start
    teacher_eval = evaluate_in_process(functools.partial(build_student, {"preset": None, "source": str(teacher_ref),
                                                                         "registry": reg}),
                                       tensors.eval, cfg.training)
    signature = {**model_signature(student_config), "distill_teacher": str(teacher_ref),
                 "temperature": cfg.temperature, "alpha": cfg.alpha}
    spec = LoopSpec(model_factory=factory, loss_fn=loss_fn, signature=signature)
    from llmstack.train.tracking import track_run

    with track_run(cfg.tracking, run_name=cfg.name, params=to_dict(cfg), kind="distill") as tracker:
        outcome = run_training(spec, tensors.train, tensors.eval, training=cfg.training, scaling=cfg.scaling,
                               run_name=cfg.name, storage=default_storage(reg, cfg.storage_path),
                               storage_options=cfg.storage_options or None, progress=progress, desc="distill",
                               on_record=tracker.log_step)
        try:
            metrics = summarize(outcome, before=before, trainable=trainable, total=total)
            metrics.update(teacher_eval_loss=teacher_eval, teacher_params=teacher_params,
                           student_to_teacher_params=total / max(teacher_params, 1))
            model = factory()
            model.load_state_dict(load_trainable(outcome.checkpoint_dir))
            model.eval()
            from llmstack.models import register_model

            ref = register_model(reg, cfg.name, model, tokenizer, kind="model", parents=parents, config=to_dict(cfg),
                                 metrics=metrics, data_fingerprint=tensors.fingerprint,
                                 extra={"distilled_from": str(teacher_ref), "temperature": cfg.temperature,
                                        "alpha": cfg.alpha, "student": cfg.student, "run_dir": outcome.run_dir,
                                        "checkpoint": outcome.checkpoint_path})
        finally:
            outcome.cleanup()
        tracker.finish(metrics, registry_version=str(ref))
    return DistillResult(ref=ref, teacher=teacher_ref, metrics=metrics, history=outcome.history,
                         run_dir=outcome.run_dir, checkpoint_path=outcome.checkpoint_path)
