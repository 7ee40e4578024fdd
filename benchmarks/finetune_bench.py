"""Fine-tuning benchmark: LoRA, QLoRA, DoRA, norm-scale tuning (BitFit analogue) vs full fine-tuning.

One run, one base, every method through the *same* per-worker loop that ``finetune_lora()`` runs on
Ray Train (``llmstack.train.loop.run_worker_loop``, in-process here so that memory is one process's
and nothing else shares it), each method in its own fresh subprocess:

* base: the ``small`` preset widened to ``--layers`` decoder layers (16 -> 54.6M parameters with the
  4096-token BPE of builtin:stdlib), pretrained for ``--pretrain-steps`` steps on builtin:stdlib (the
  driver runs the shared loop in bf16), registered in a scratch registry;
* data: ``builtin:stdlib-qa`` prompt/response pairs (loss on response tokens only), its held-out
  split for eval;
* per method: trainable-parameter fraction; peak resident memory while training (VmRSS, sampled
  every 2 ms from /proc, above a baseline taken after imports, data and a warm-up run of the method
  on a tiny model; allocations >= 64 KiB are mmaps that go back to the OS when freed, so it follows
  live tensors; a frozen base read through mmap counts by its resident file pages) and the analytic
  weights + grads + AdamW-state bytes; tokens/s (median step, first step excluded); held-out answer-loss improvement after ``--steps`` steps, as a share of full FT's;
* distillation: a ``tiny`` student trained on the fully fine-tuned model's softened outputs
  (T=2, alpha=0.5) vs the same student, same steps and seed, with hard labels only (alpha=0).

Writes benchmarks/results/finetune.json, benchmarks/results/finetune.png and the ``## finetune``
section of benchmarks/RESULTS.md.

    python benchmarks/finetune_bench.py          # ~8-10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR, RESULTS_MD, cpu_name, logger, write_json, write_section
from harness.plots import figure as new_figure

# Measured subprocesses inherit these: every allocation >= 64 KiB is its own mmap, returned to the OS
# when freed, so resident memory tracks live tensors instead of glibc's retained heap.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")

RESULTS_JSON = RESULTS_DIR / "finetune.json"
PLOT = RESULTS_DIR / "finetune.png"
METHODS = ("full", "lora", "qlora", "dora", "bitfit")
LEARNING_RATES = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "dora": 2e-3, "bitfit": 1e-2}
LR_GRID = (1.0, 1 / 3, 3.0)  # each method's quality is taken at its best rate of default x these
QA = "builtin:stdlib-qa"
log = logger()


# ----------------------------------------------------------------------------- memory sampling


def rss_bytes() -> int:
    """Resident memory of this process: anonymous pages (tensors, activations, allocator slack) plus
    mapped file pages (a frozen base that loading left as a view of its mmapped safetensors file is
    memory the method holds, even though no copy was made)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trim() -> None:
    """Return freed heap pages to the OS so RSS reflects live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak = interval_s, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ----------------------------------------------------------------------------- one method (subprocess)


def tensor_bytes(model: Any) -> dict[str, int]:
    """Weights as stored (NF4 packed counts as stored), plus fp32 grads and two AdamW moments per trainable."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "grads": trainable, "optimizer": 2 * trainable,
            "total": weights + 3 * trainable}


def run_method(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method for ``job['steps']`` steps through the shared loop; measure everything."""
    import torch

    torch.set_num_threads(job["threads"])
    from llmstack.config import FinetuneMethodConfig, LoopConfig
    from llmstack.finetune.methods import ModelFactory, count_trainable
    from llmstack.registry import Registry
    from llmstack.train.loop import LocalSession, LoopSpec, evaluate, run_worker_loop

    data = load_data(job["data"])
    warm_up(job, data)
    trim()
    baseline = rss_bytes()
    method = job["method"]
    with PeakRSS() as load_peak:
        factory = ModelFactory(Registry(job["registry"]), job["base"], method,
                               FinetuneMethodConfig(method=method, rank=job["rank"], alpha=2.0 * job["rank"], dropout=0.0),
                               seed=0)
        model = factory()
    trim()
    trainable, total = count_trainable(model)
    def config(learning_rate: float) -> LoopConfig:
        return LoopConfig(max_steps=job["steps"], micro_batch_size=job["micro"], learning_rate=learning_rate,
                              warmup_steps=1, eval_every=job["steps"], eval_batches=job["eval_batches"],
                              checkpoint_every=0, weight_decay=0.0, min_lr_ratio=1.0)

    rates, grid = job.get("learning_rates", LEARNING_RATES), job.get("lr_grid", LR_GRID)
    spec = LoopSpec(model_factory=_returning(model))
    before = evaluate(model, spec, data["eval"], config(rates[method]), device=torch.device("cpu"))
    trim()
    session = LocalSession(None)
    with PeakRSS() as train_peak:
        run_worker_loop(spec, data["train"], data["eval"], config(rates[method]), session=session)
    records = session.records
    step_times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    step_cpu = [r["step_cpu_s"] for r in records[1:]] or [records[0]["step_cpu_s"]]
    tokens_per_step = job["micro"] * data["train"]["input_ids"].shape[1]
    sweep = {rates[method]: session.reports[-1]["eval_loss"]}
    speed_losses = [r["loss"] for r in records]  # the run at the default rate (the one timed)
    best_model = model
    memory = {"peak_rss_train_bytes": train_peak.peak - baseline, "peak_rss_load_bytes": load_peak.peak - baseline,
              "tensor_bytes": tensor_bytes(model)}
    # Quality at the method's best learning rate: the same steps from the same base at each other rate
    # of the grid (memory and speed come from the run above; they do not depend on the rate).
    for factor in grid:
        if factor == 1.0:
            continue
        rate = rates[method] * factor
        del spec
        model = factory()
        spec = LoopSpec(model_factory=_returning(model))
        sweep_session = LocalSession(None)
        run_worker_loop(spec, data["train"], data["eval"], config(rate), session=sweep_session)
        sweep[rate] = sweep_session.reports[-1]["eval_loss"]
        if sweep[rate] == min(sweep.values()):
            records, best_model = sweep_session.records, model
        del model
        trim()
    best_rate = min(sweep, key=sweep.get)
    after = sweep[best_rate]
    result = {"method": method, "trainable_params": trainable, "total_params": total,
              "trainable_fraction": trainable / total, **memory,
              "step_time_s": statistics.median(step_times), "tokens_per_s": tokens_per_step / statistics.median(step_times),
              "step_cpu_s": statistics.median(step_cpu), "tokens_per_cpu_s": tokens_per_step / statistics.median(step_cpu),
              "default_rate_train_loss": speed_losses,
              "eval_loss_before": before, "eval_loss_after": after, "improvement": before - after,
              "train_loss": [r["loss"] for r in records], "learning_rate": best_rate,
              "lr_sweep": {f"{k:g}": v for k, v in sorted(sweep.items())}}
    if job.get("save_to"):
        from llmstack.models import save_model

        best_model.eval()
        save_model(best_model, None, job["save_to"])
    return result


def _returning(model: Any) -> Any:
    return lambda: model


def run_distill(job: dict[str, Any]) -> dict[str, Any]:
    """A tiny student with (alpha>0) or without (alpha=0) the teacher, same seed/steps/data."""
    import functools

    import torch

    torch.set_num_threads(job["threads"])
    from llmstack.config import LoopConfig
    from llmstack.finetune.distill import DistillLoss, build_student
    from llmstack.registry import Registry
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    data = load_data(job["data"])
    factory = functools.partial(build_student, job["student"])
    loss = DistillLoss(registry=Registry(job["registry"]), teacher=job["teacher"], temperature=job["temperature"],
                       alpha=job["alpha"])
    training = LoopConfig(max_steps=job["steps"], micro_batch_size=job["micro"], learning_rate=3e-3,
                              warmup_steps=2, eval_every=job["steps"], eval_batches=job["eval_batches"],
                              checkpoint_every=0, weight_decay=0.0)
    session = LocalSession(None)
    started = time.perf_counter()
    run_worker_loop(LoopSpec(model_factory=factory, loss_fn=loss), data["train"], data["eval"], training,
                    session=session)
    return {"alpha": job["alpha"], "temperature": job["temperature"], "eval_loss": session.reports[-1]["eval_loss"],
            "seconds": time.perf_counter() - started}


def save_data(tensors: Any, path: Path) -> None:
    from safetensors.torch import save_file

    flat = {f"{split}/{k}": v.contiguous() for split in ("train", "eval") for k, v in getattr(tensors, split).items()}
    save_file(flat, str(path))


def load_data(path: str) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    data: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
    for key, value in load_file(path).items():
        split, name = key.split("/", 1)
        data[split][name] = value
    return data


def in_subprocess(fn: Any, job: dict[str, Any]) -> dict[str, Any]:
    context = mp.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(fn, (job,))


# ----------------------------------------------------------------------------- driver


class ProgressSession:
    """A LocalSession that also advances a tqdm bar per optimizer step."""

    def __new__(cls, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        from llmstack.train.loop import LocalSession

        class _Session(LocalSession):
            def log(self, record: dict[str, Any]) -> None:
                super().log(record)
                if "loss" in record:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{record['loss']:.3f}")

        session = _Session(None)
        session.bar = tqdm(total=total, desc=desc, unit="step")
        return session


def build_base(root: Path, layers: int, vocab: int, block: int, *, pretrain_steps: int,
               threads: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The base every method fine-tunes: the widened ``small`` preset, pretrained on builtin:stdlib.

    Fine-tuning adapts a pretrained model; a random-init base would measure how fast each method learns
    token statistics from scratch instead. Pretraining runs the same shared loop (bf16 autocast, packed
    128-token blocks of the stdlib corpus), in this driver process, which is not measured. Also
    registers ``bench-warmup`` (the ``tiny`` preset, same tokenizer), which each measured process loads
    and trains once before its memory baseline.
    """
    import torch
    from transformers import LlamaForCausalLM

    from llmstack.config import LoopConfig
    from llmstack.data import load_corpus, pack_corpus, trained_tokenizer
    from llmstack.models import preset_config, register_model
    from llmstack.registry import Registry
    from llmstack.train.loop import LoopSpec, run_worker_loop

    corpus = load_corpus("builtin:stdlib")
    tokenizer = trained_tokenizer(corpus, vocab_size=vocab)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = preset_config("small", vocab_size=len(tokenizer), max_seq_len=max(block, 128), **special)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretraining: dict[str, Any] = {"steps": pretrain_steps}
    if pretrain_steps > 0:
        torch.set_num_threads(threads)
        packed = pack_corpus(corpus, tokenizer, block_size=128)
        training = LoopConfig(max_steps=pretrain_steps, micro_batch_size=8, learning_rate=1e-3,
                                  warmup_steps=max(1, pretrain_steps // 20), eval_every=pretrain_steps,
                                  eval_batches=4, checkpoint_every=0, precision="bf16")
        log(f"pretraining the base: {pretrain_steps} steps x 8 blocks x 128 tokens of builtin:stdlib")
        session = ProgressSession(pretrain_steps, "pretrain base")
        started = time.perf_counter()
        run_worker_loop(LoopSpec(model_factory=lambda: model), {"input_ids": packed.train},
                        {"input_ids": packed.eval}, training, session=session)
        session.bar.close()
        losses = [r["loss"] for r in session.records]
        pretraining.update(first_loss=losses[0], last_loss=losses[-1], eval_loss=session.reports[-1]["eval_loss"],
                           tokens=pretrain_steps * 8 * 128, seconds=time.perf_counter() - started)
        log(f"  pretraining loss {losses[0]:.2f} -> {losses[-1]:.2f}, eval {pretraining['eval_loss']:.2f} "
            f"({pretraining['seconds']:.0f} s)")
    model.eval()
    registry = Registry(str(root / "registry"))
    ref = register_model(registry, "bench-base", model, tokenizer, kind="model")
    torch.manual_seed(0)
    warmup = LlamaForCausalLM(preset_config("tiny", vocab_size=len(tokenizer), max_seq_len=max(block, 128),
                                            **special))
    register_model(registry, "bench-warmup", warmup, tokenizer, kind="model")
    return registry, ref, tokenizer, pretraining


def warm_up(job: dict[str, Any], data: dict[str, dict[str, Any]]) -> None:
    """Load and train the tiny ``bench-warmup`` model once the method's way, then drop it.

    This imports and initializes everything the method uses lazily (the bitsandbytes quantizer
    integration, peft's tuners, the optimizer...): one-off resident memory that does not grow with
    the model and would otherwise be charged to whichever method touches it first.
    """
    import torch

    from llmstack.config import FinetuneMethodConfig
    from llmstack.finetune.methods import ModelFactory
    from llmstack.registry import Registry

    method = job["method"]
    model = ModelFactory(Registry(job["registry"]), "bench-warmup@v1", method,
                         FinetuneMethodConfig(method=method, rank=job["rank"], alpha=2.0 * job["rank"], dropout=0.0), seed=0)()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = data["train"]["input_ids"][: job["micro"]]
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    del model, optimizer


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llmstack.finetune.data import instruction_tensors
    from llmstack.models import count_parameters, load_artifact

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="llmstack-ftbench-"))
    registry, ref, tokenizer, pretraining = build_base(root, args.layers, args.vocab, args.block,
                                                      pretrain_steps=args.pretrain_steps, threads=args.threads)
    base_params = count_parameters(load_artifact(str(ref), registry=registry, with_tokenizer=False).model)
    log(f"base: small preset with {args.layers} layers, {base_params / 1e6:.1f}M parameters ({ref})")
    tensors = instruction_tensors(QA, tokenizer, max_length=args.block, max_rows=args.rows)
    data_path = root / "data.safetensors"
    save_data(tensors, data_path)
    common = {"registry": str(root / "registry"), "base": str(ref), "data": str(data_path), "threads": args.threads,
              "steps": args.steps, "micro": args.micro, "rank": args.rank, "eval_batches": args.eval_batches}
    methods: dict[str, Any] = {}
    teacher_dir = root / "teacher"
    for method in METHODS:
        job = {**common, "method": method, "save_to": str(teacher_dir) if method == "full" else None}
        log(f"{method}: {args.steps} steps")
        methods[method] = in_subprocess(run_method, job)
        m = methods[method]
        log(f"  trainable {m['trainable_fraction']:.4%}, peak {m['peak_rss_train_bytes'] / 2**20:.0f} MiB, "
            f"{m['tokens_per_s']:.0f} tok/s, eval {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}")
    full = methods["full"]
    for m in methods.values():
        m["memory_vs_full"] = m["peak_rss_train_bytes"] / full["peak_rss_train_bytes"]
        m["tensor_bytes_vs_full"] = m["tensor_bytes"]["total"] / full["tensor_bytes"]["total"]
        m["speed_vs_full"] = m["tokens_per_s"] / full["tokens_per_s"]
        m["quality_vs_full"] = m["improvement"] / full["improvement"] if full["improvement"] > 0 else None

    # Distillation: teacher = the fully fine-tuned base (saved by the full run), student = tiny preset.
    tokenizer.save_pretrained(str(teacher_dir))
    from llmstack.models import PRESETS
    from llmstack.registry import Registry

    teacher_ref = Registry(str(root / "registry")).register("bench-teacher", teacher_dir, kind="model",
                                                             parents=[str(ref)])
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    student = {"preset": args.student, "vocab_size": len(tokenizer), "max_seq_len": max(args.block, 128), "seed": 0,
               "special": special}
    distill: dict[str, Any] = {"teacher": "full fine-tune of the base", "student_preset": args.student,
                               "student_layers": PRESETS[args.student]["num_hidden_layers"],
                               "steps": args.distill_steps}
    for alpha in (args.alpha, 0.0):
        log(f"distill: student alpha={alpha}")
        distill[f"alpha_{alpha}"] = in_subprocess(run_distill, {
            **common, "steps": args.distill_steps, "teacher": str(teacher_ref), "student": student,
            "temperature": args.temperature, "alpha": alpha})
    with_teacher, without = distill[f"alpha_{args.alpha}"]["eval_loss"], distill["alpha_0.0"]["eval_loss"]
    distill.update(with_teacher_eval_loss=with_teacher, without_teacher_eval_loss=without,
                   ratio=with_teacher / without, teacher_eval_loss=full["eval_loss_after"])
    import shutil

    import bitsandbytes
    import peft

    shutil.rmtree(root, ignore_errors=True)  # the scratch registry holds ~0.5 GB of weights
    return {
        "command": "python benchmarks/finetune_bench.py " + " ".join(sys.argv[1:]),
        "seconds": time.perf_counter() - started,
        "machine": {"cpus": os.cpu_count(), "processor": cpu_name(), "torch": torch.__version__,
                    "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "threads": args.threads},
        "setup": {"base_params": base_params, "layers": args.layers, "vocab": len(tokenizer), "block": args.block,
                  "micro_batch": args.micro, "steps": args.steps, "rank": args.rank, "alpha": 2 * args.rank,
                  "train_rows": tensors.num_train_rows, "eval_rows_used": args.eval_batches * args.micro,
                  "learning_rates": LEARNING_RATES, "pretraining": pretraining},
        "methods": methods, "distill": distill,
    }


# ----------------------------------------------------------------------------- a real model (--model DIR)

# Rates for a pretrained model (a few steps, micro-batch 4): full fine-tuning moves every weight, so it
# takes the smallest; adapters start at zero and norm scales are few, so they take larger ones.
REAL_LEARNING_RATES = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "bitfit": 5e-3}
REAL_RESULTS_JSON = RESULTS_DIR / "finetune_real.json"
REAL_PLOT = RESULTS_DIR / "finetune_real.png"


def run_trainer_lora(job: dict[str, Any]) -> dict[str, Any]:
    """The same LoRA run with ``transformers.Trainer`` + peft, as Axolotl/TRL users run it.

    Same base files, adapter (rank, alpha, targets, seeded init), rows in the same order, micro-batch,
    steps, constant LR, AdamW betas, clipping and threads as the ``lora`` method's run; memory measured
    the same way (peak VmRSS above a baseline taken after a warm-up Trainer run on the tiny model).
    """
    import torch

    torch.set_num_threads(job["threads"])
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from llmstack.finetune.methods import resolve_target_modules
    from llmstack.train.sharding import BlockSampler

    data = load_data(job["data"])
    train = data["train"]
    sampler = BlockSampler(len(train["input_ids"]), world_size=1, rank=0, per_step=job["micro"], seed=0)
    order = torch.cat([sampler.step_indices(step) for step in range(job["steps"])])
    rows = {k: v[order] for k, v in train.items()}

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows["input_ids"])

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: v[i] for k, v in rows.items()}

    class InOrder(Trainer):  # rows already in llmstack's order
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    marks: list[tuple[str, float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(("begin", time.perf_counter(), time.process_time()))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(("end", time.perf_counter(), time.process_time()))

    def lora_model(directory: str) -> Any:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        config = LoraConfig(r=job["rank"], lora_alpha=2.0 * job["rank"], lora_dropout=0.0, bias="none",
                            target_modules=resolve_target_modules(model, None), task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return get_peft_model(model, config)

    def trainer(model: Any, steps: int, out: str) -> Any:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=job["micro"], max_steps=steps,
            learning_rate=job["learning_rates"]["lora"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, use_cpu=True,
            save_strategy="no", report_to=[], logging_steps=1, dataloader_num_workers=0, dataloader_pin_memory=False,
            disable_tqdm=True, seed=0)
        return InOrder(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])

    with tempfile.TemporaryDirectory(prefix="trainer-lora-") as out:
        trainer(lora_model(job["warmup_dir"]), 1, out).train()  # lazy imports and one-off init, off the books
        marks.clear()
        trim()
        baseline = rss_bytes()
        with PeakRSS() as load_peak:
            model = lora_model(job["base_dir"])
        run = trainer(model, job["steps"], out)
        trim()
        with PeakRSS() as train_peak:
            run.train()
    begins = [m for m in marks if m[0] == "begin"]
    ends = [m for m in marks if m[0] == "end"]
    wall = [e[1] - b[1] for b, e in zip(begins, ends)][1:]
    cpu = [e[2] - b[2] for b, e in zip(begins, ends)][1:]
    tokens = job["micro"] * train["input_ids"].shape[1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_rss_train_bytes": train_peak.peak - baseline, "peak_rss_load_bytes": load_peak.peak - baseline,
            "step_time_s": statistics.median(wall), "tokens_per_s": tokens / statistics.median(wall),
            "step_cpu_s": statistics.median(cpu), "tokens_per_cpu_s": tokens / statistics.median(cpu),
            "trainable_params": trainable,
            "train_loss": [h["loss"] for h in run.state.log_history if "loss" in h and "train_loss" not in h],
            "optimizer_fused": bool(getattr(run.optimizer, "defaults", {}).get("fused"))}


def measure_real(args: argparse.Namespace) -> dict[str, Any]:
    """Every method on a pretrained model directory, plus the LoRA run side by side with Trainer + peft."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from llmstack.finetune.data import instruction_tensors
    from llmstack.models import load_tokenizer, preset_config, register_model
    from llmstack.registry import Registry

    started = time.perf_counter()
    base_dir = str(Path(args.model).expanduser().resolve())
    root = Path(tempfile.mkdtemp(prefix="llmstack-ftbench-real-"))
    try:
        tokenizer = load_tokenizer(base_dir)
        tensors = instruction_tensors(QA, tokenizer, max_length=args.block, max_rows=args.rows)
        if tensors.eval is None:
            raise RuntimeError(f"{QA} gave no held-out rows")
        data_path = root / "data.safetensors"
        save_data(tensors, data_path)
        registry = Registry(str(root / "registry"))
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        warmup = LlamaForCausalLM(preset_config("tiny", vocab_size=len(tokenizer), max_seq_len=max(args.block, 128),
                                                **special))
        register_model(registry, "bench-warmup", warmup, tokenizer, kind="model")
        warmup_dir = root / "warmup"
        warmup.save_pretrained(str(warmup_dir))
        common = {"registry": str(root / "registry"), "base": base_dir, "data": str(data_path),
                  "threads": args.threads, "steps": args.steps, "micro": args.micro, "rank": args.rank,
                  "eval_batches": args.eval_batches, "learning_rates": REAL_LEARNING_RATES, "lr_grid": [1.0]}
        methods: dict[str, Any] = {}
        pair: dict[str, list[dict[str, Any]]] = {"llmstack": [], "trainer": []}
        for method in args.methods:
            log(f"{method}: {args.steps} steps on {Path(base_dir).name}")
            methods[method] = in_subprocess(run_method, {**common, "method": method})
            m = methods[method]
            log(f"  trainable {m['trainable_fraction']:.4%}, peak {m['peak_rss_train_bytes'] / 2**20:.0f} MiB, "
                f"{m['tokens_per_s']:.0f} tok/s, eval {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}")
            if method == "lora":
                pair["llmstack"].append(m)
                for round_index in range(args.pair_rounds):
                    job = {**common, "base_dir": base_dir, "warmup_dir": str(warmup_dir)}
                    log(f"Trainer + peft LoRA (round {round_index})")
                    pair["trainer"].append(in_subprocess(run_trainer_lora, job))
                    t = pair["trainer"][-1]
                    log(f"  peak {t['peak_rss_train_bytes'] / 2**20:.0f} MiB, {t['tokens_per_s']:.0f} tok/s")
                    if round_index + 1 < args.pair_rounds:
                        log("llmstack LoRA again (interleaved)")
                        pair["llmstack"].append(in_subprocess(run_method, {**common, "method": "lora"}))
        full = methods.get("full")
        for m in methods.values():
            if full is not None:
                m["memory_vs_full"] = m["peak_rss_train_bytes"] / full["peak_rss_train_bytes"]
                m["tensor_bytes_vs_full"] = m["tensor_bytes"]["total"] / full["tensor_bytes"]["total"]
                m["quality_vs_full"] = m["improvement"] / full["improvement"] if full["improvement"] > 0 else None
        side_by_side = None
        if pair["trainer"]:
            def med(side: str, key: str) -> float:
                return statistics.median(r[key] for r in pair[side])

            ours, theirs = pair["llmstack"][0]["default_rate_train_loss"], pair["trainer"][0]["train_loss"]
            side_by_side = {
                "llmstack": pair["llmstack"], "trainer": pair["trainer"],
                "tokens_per_s_ratio": med("llmstack", "tokens_per_s") / med("trainer", "tokens_per_s"),
                "tokens_per_cpu_s_ratio": med("llmstack", "tokens_per_cpu_s") / med("trainer", "tokens_per_cpu_s"),
                "peak_memory_ratio": med("llmstack", "peak_rss_train_bytes") / med("trainer", "peak_rss_train_bytes"),
                "train_loss_max_abs_diff": max(abs(a - b) for a, b in zip(ours, theirs)),
            }
        import peft
        import transformers

        return {
            "command": "python benchmarks/finetune_bench.py " + " ".join(sys.argv[1:]),
            "seconds": time.perf_counter() - started,
            "machine": {"cpus": os.cpu_count(), "processor": cpu_name(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__, "threads": args.threads},
            "setup": {"model": Path(base_dir).name, "block": args.block, "micro_batch": args.micro, "steps": args.steps,
                      "rank": args.rank, "alpha": 2 * args.rank, "train_rows": tensors.num_train_rows,
                      "eval_rows": tensors.num_eval_rows, "eval_rows_used": args.eval_batches * args.micro,
                      "learning_rates": REAL_LEARNING_RATES},
            "methods": methods, "side_by_side": side_by_side,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markdown_real(results: dict[str, Any]) -> str:
    s, m, machine = results["setup"], results["methods"], results["machine"]
    lines = [
        f"Reproduce: `{results['command'].strip()}` ({results['seconds']:.0f} s; {machine['cpus']} CPU cores, "
        f"{machine['threads']} thread(s), CPU {machine['processor']}; torch {machine['torch']}, transformers "
        f"{machine['transformers']}, peft {machine['peft']}).", "",
        f"{s['model']} on `builtin:stdlib-qa` in its own chat template (loss on answer tokens), {s['train_rows']} "
        f"train rows of {s['block']} tokens, micro-batch {s['micro_batch']}, {s['steps']} steps, constant LR "
        f"({', '.join(f'{k} {v:g}' for k, v in s['learning_rates'].items())}); held-out answer loss on "
        f"{s['eval_rows_used']} rows of the eval split; LoRA-family rank {s['rank']}, alpha {s['alpha']}.", "",
        "| method | trainable share | peak train RSS MiB | memory / full | tokens/s | held-out loss before -> after "
        "| improvement / full |", "|---|---:|---:|---:|---:|---|---:|"]
    for name, r in m.items():
        quality = r.get("quality_vs_full")
        lines.append(f"| {name} | {r['trainable_fraction']:.3%} | {r['peak_rss_train_bytes'] / 2**20:.0f} | "
                     f"{r.get('memory_vs_full', float('nan')):.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} | "
                     f"{'n/a' if quality is None else f'{quality:.2f}'} |")
    pair = results.get("side_by_side")
    if pair:
        def row(name: str, runs: list[dict[str, Any]]) -> str:
            tps = statistics.median(r["tokens_per_s"] for r in runs)
            cps = statistics.median(r["tokens_per_cpu_s"] for r in runs)
            peak = statistics.median(r["peak_rss_train_bytes"] for r in runs)
            return f"| {name} | {len(runs)} | {tps:.0f} | {cps:.0f} | {peak / 2**20:.0f} |"

        lines += ["", "| LoRA run | runs | tokens/s (wall) | tokens/s (CPU time) | peak train RSS MiB |",
                  "|---|---:|---:|---:|---:|", row("llmstack (shared loop)", pair["llmstack"]),
                  row("transformers Trainer + peft", pair["trainer"]), "",
                  f"llmstack / Trainer: tokens/s **{pair['tokens_per_s_ratio']:.2f}x** (CPU time "
                  f"{pair['tokens_per_cpu_s_ratio']:.2f}x), peak memory **{pair['peak_memory_ratio']:.2f}x**; "
                  f"train-loss curves differ by at most {pair['train_loss_max_abs_diff']:.2g}."]
    return "\n".join(lines) + "\n"


def plot_real(results: dict[str, Any], path: Path = REAL_PLOT) -> None:
    methods = list(results["methods"])
    figure = new_figure(figsize=(11, 3.6), dpi=110)
    axes = figure.subplots(1, 3)
    panels = (("memory_vs_full", "peak training memory / full FT"),
              ("quality_vs_full", "held-out answer-loss improvement / full FT"))
    for ax, (key, title) in zip(axes[:2], panels, strict=True):
        ax.bar(methods, [results["methods"][m].get(key) or 0.0 for m in methods],
               color=["#777" if m == "full" else "#3a7" for m in methods])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    pair = results.get("side_by_side")
    if pair:
        ax = axes[2]
        ax.bar(["tokens/s", "tokens/CPU-s", "peak memory"],
               [pair["tokens_per_s_ratio"], pair["tokens_per_cpu_s_ratio"], pair["peak_memory_ratio"]])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title("LoRA: llmstack / Trainer + peft", fontsize=9)
    figure.suptitle(f"{results['setup']['model']}, builtin:stdlib-qa", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


# ----------------------------------------------------------------------------- output


def plot(results: dict[str, Any]) -> None:
    methods = list(results["methods"])
    figure = new_figure(figsize=(11, 3.6), dpi=110)
    axes = figure.subplots(1, 3)
    panels = (("memory_vs_full", "peak training memory / full FT"), ("speed_vs_full", "tokens/s / full FT"),
              ("quality_vs_full", "held-out loss improvement / full FT"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [results["methods"][m][key] or 0.0 for m in methods]
        ax.bar(methods, values, color=["#777" if m == "full" else "#3a7" for m in methods])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT)


def markdown(results: dict[str, Any]) -> str:
    s, m, d = results["setup"], results["methods"], results["distill"]
    machine = results["machine"]
    pre = s.get("pretraining", {"steps": 0})
    if pre["steps"]:
        base_text = (f"pretrained here for {pre['steps']} steps ({pre['tokens']:,} tokens of `builtin:stdlib`, bf16 "
                     f"autocast, {pre['seconds']:.0f} s; train loss {pre['first_loss']:.2f} -> {pre['last_loss']:.2f}, "
                     f"held-out {pre['eval_loss']:.2f})")
    else:
        base_text = "random init"
    lines = [
        "## finetune", "",
        f"Reproduce: `{results['command'].strip()}` ({results['seconds']:.0f} s on {machine['cpus']} CPU cores, "
        f"torch {machine['torch']}, peft {machine['peft']}, bitsandbytes {machine['bitsandbytes']}, "
        f"{machine['threads']} intra-op thread(s); CPU: {machine['processor']}). Raw numbers: "
        "`benchmarks/results/finetune.json`; plot: `benchmarks/results/finetune.png`.", "",
        f"Base: `small` preset widened to {s['layers']} decoder layers, **{s['base_params'] / 1e6:.1f}M parameters**, "
        f"BPE {s['vocab']}, {base_text}. Data: `builtin:stdlib-qa` ({s['train_rows']} train rows, loss on response "
        f"tokens only, rows of {s['block']} tokens, micro-batch {s['micro_batch']}); eval = "
        f"{s['eval_rows_used']} rows of its held-out split. Every method ran {s['steps']} optimizer steps of the "
        "shared loop (`llmstack.train.loop.run_worker_loop`, the one finetune_lora() runs on Ray Train) in its "
        f"own fresh process; LoRA-family rank {s['rank']}, alpha {s['alpha']}, all 7 decoder linears; "
        "each method's quality is its best held-out loss over a learning-rate grid (default x 1/3, 1, 3; "
        f"defaults {', '.join(f'{k} {v:g}' for k, v in s['learning_rates'].items())}; best: "
        + ", ".join(f"{k} {r['learning_rate']:.2g}" for k, r in m.items()) + "). Peak memory = peak "
        "resident memory (VmRSS) while training, above the process's baseline after imports and data (model, "
        "grads, AdamW state, activations; a frozen base left as a view of its mmapped file counts by its "
        "resident pages). Each process first loads and trains a `tiny` model the same way, so lazy imports and "
        "one-off initialization sit in the baseline instead of being charged to a method; glibc is told to mmap "
        "every allocation >= 64 KiB so freed memory leaves RSS. Tensor bytes = weights as stored + fp32 grads + "
        "2 AdamW moments of trainables.", "",
        "| method | trainable | trainable share | peak train RSS (MiB) | memory / full | tensor bytes / full "
        "| tokens/s | speed / full | eval loss before -> after | improvement / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in m.items():
        quality = f"{r['quality_vs_full']:.2f}" if r["quality_vs_full"] is not None else "n/a"
        label = "bitfit (norm-scale tuning)" if name == "bitfit" else name
        lines.append(
            f"| {label} | {r['trainable_params']:,} | {r['trainable_fraction']:.3%} | "
            f"{r['peak_rss_train_bytes'] / 2**20:.0f} | {r['memory_vs_full']:.2f} | {r['tensor_bytes_vs_full']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['speed_vs_full']:.2f} | {r['eval_loss_before']:.3f} -> "
            f"{r['eval_loss_after']:.3f} | {quality} |")
    lora, qlora = m["lora"], m["qlora"]
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    lines += [
        "",
        f"Distillation: teacher = the fully fine-tuned base above (held-out loss {d['teacher_eval_loss']:.3f}); "
        f"student = fresh `{d['student_preset']}` preset, {d['steps']} steps, same seed and data. Held-out "
        f"answer loss with the teacher (T=2, alpha=0.5) **{d['with_teacher_eval_loss']:.3f}** vs hard labels only "
        f"**{d['without_teacher_eval_loss']:.3f}** (ratio {d['ratio']:.3f}; < 1 means the teacher helped)."
        + (" The teacher is itself worse on these answers than the student trained alone, so this run cannot "
           "show a distillation gain." if d["teacher_eval_loss"] > d["without_teacher_eval_loss"] else ""),
        "",
        "Against the issue's targets (measured here):", "",
        f"- LoRA peak memory {lora['memory_vs_full']:.2f}x full FT (target <= 0.5x): {met(lora['memory_vs_full'] <= 0.5)}.",
        f"- QLoRA peak memory {qlora['memory_vs_full']:.2f}x, below LoRA's {lora['memory_vs_full']:.2f}x: "
        f"{met(qlora['memory_vs_full'] < lora['memory_vs_full'])}.",
        f"- LoRA quality {lora['quality_vs_full'] or 0:.2f} of full FT's held-out improvement (target >= 0.90): "
        f"{met((lora['quality_vs_full'] or 0) >= 0.9)}.",
        f"- Caveats: {s['steps']} steps per method on 2 CPU cores; the quality share is how much of full "
        "fine-tuning's held-out improvement each method makes in the same steps at its own learning rate. On "
        "CPU, QLoRA's 4-bit matmuls dequantize every step, so it trades speed for memory; tokens/s ratios move "
        "with machine load (methods run one after another).",
        "- Learning rates at the top of the grid (a higher rate might do better still): "
        + (", ".join(name for name, r in m.items() if _at_grid_top(r)) or "none") + ".",
        f"- QLoRA's tensors are {qlora['tensor_bytes_vs_full']:.2f}x full FT's (NF4 weights are "
        f"{qlora['tensor_bytes']['weights'] / lora['tensor_bytes']['weights']:.2f}x LoRA's); the rest of every "
        "peak is activations and allocator slack, which the 4-bit base does not shrink.",
    ]
    return "\n".join(lines) + "\n"


def _at_grid_top(r: dict[str, Any]) -> bool:
    rates = [float(k) for k in r.get("lr_sweep", {})]
    return bool(rates) and r["learning_rate"] >= max(rates) * (1 - 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the widened small preset")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=64, help="tokens per row")
    parser.add_argument("--micro", type=int, default=4, help="rows per step")
    parser.add_argument("--rows", type=int, default=512, help="train rows read")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per method")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="steps pretraining the base on builtin:stdlib before fine-tuning (0: random init)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--distill-steps", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the plot and RESULTS.md section from benchmarks/results/finetune.json")
    parser.add_argument("--model", help="a pretrained HF model directory: fine-tune it (no pretraining, no "
                        "distillation) and compare the LoRA run with Trainer + peft; writes finetune_real.json/png "
                        "and prints the tables (RESULTS.md untouched)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pair-rounds", type=int, default=1,
                        help="--model: Trainer + peft runs (llmstack LoRA reruns between them, interleaved)")
    parser.add_argument("--results-name", default="finetune_real", help="--model: results/<name>.json and .png")
    args = parser.parse_args()
    if args.model:
        results = measure_real(args)
        path = REAL_RESULTS_JSON.with_name(f"{args.results_name}.json")
        write_json(path, results)
        plot_real(results, path.with_suffix(".png"))
        print(markdown_real(results))
        log(f"wrote {path} and {path.with_suffix('.png')}")
        return 0
    if args.render_only:
        results = json.loads(RESULTS_JSON.read_text())
    else:
        results = measure(args)
        write_json(RESULTS_JSON, results)
    plot(results)
    write_section("finetune", markdown(results))
    log(f"wrote {RESULTS_JSON}, {PLOT} and the finetune section of {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
