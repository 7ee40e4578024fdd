"""Training benchmarks: throughput/MFU, Ray Train overhead, activation checkpointing, FSDP vs DDP memory.

Everything is measured side by side in one run on this machine; nothing here is asserted.

    python benchmarks/train_bench.py            # writes benchmarks/results/train.json (+ train_*.png)

1. Tokens/s and MFU: FLOPs/token = 6N + 12·L·d·T (the attention score/value matmuls), against the
   fp32 matmul peak of this machine measured in the same process with the same thread count.
2. Ray Train overhead: steady-state seconds per optimizer step of the same loop, model and data,
   under Ray Train (1 worker, run_training: process group, metrics actor, reports) vs a plain
   single-process call of run_worker_loop. Start-up excluded (steps after the first few).
3. Activation checkpointing: peak memory above the pre-training baseline and step time, on vs off
   (each config in a fresh subprocess; glibc mmap threshold fixed so freed tensors leave the RSS).
4. FSDP vs DDP with 2 Ray Train workers: bytes of parameters + gradients + optimizer state held by
   one worker after a step (local shards under FSDP), and that worker's peak RSS.

``--vs-trainer`` runs only a fifth part, written to ``benchmarks/results/train_vs_trainer.json`` and
``train_vs_trainer.png`` (RESULTS.md untouched):

5. ``llmstack`` training (``run_training``, 1 Ray Train worker, what ``llmstack.train`` runs) vs
   ``transformers.Trainer`` on the same model (the ``small`` preset and, with ``--model DIR``, a
   pretrained checkpoint: continued pretraining), the same token blocks in the same order, the same
   threads, precision, AdamW settings, clipping and constant LR, so both loss curves must agree;
   interleaved rounds (the order alternates), each run in a fresh process; tokens/s from the median
   step-to-step wall time and from the median per-step process CPU time (robust to other load).

    flock /tmp/llmstack-ray.lock timeout 1800 python benchmarks/train_bench.py --vs-trainer \
        --model ~/.cache/llmstack/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR as RESULTS
from harness import cpu_name, markdown_table, write_json, write_section
from harness.plots import figure as new_figure
from harness.timing import steady_median

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- helpers


def matmul_peak_flops(n: int = 1024, repeats: int = 40) -> float:
    """Best fp32 matmul FLOP/s over ``repeats`` n x n products, with the current torch thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def flops_per_token(model_config: Any, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token (fwd + bwd): 6N (non-embedding params) + 12·L·d·T, and N."""
    d, layers, vocab = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    total = _param_count(model_config)
    embedding = vocab * d  # input embedding: a lookup, no matmul
    n = total - embedding
    return 6 * n + 12 * layers * d * seq_len, total


def _param_count(model_config: Any) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    return sum(p.numel() for p in model.parameters())


def _data(vocab: int, blocks: int, block_size: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (blocks, block_size), generator=g)}


def _spec(preset: str, vocab: int, seq: int) -> Any:
    from llmstack.train.driver import build_preset_model
    from llmstack.train.loop import LoopSpec

    return LoopSpec(model_factory=functools.partial(build_preset_model, preset, vocab_size=vocab, max_seq_len=seq,
                                                    seed=0))


def _steady_interval(history: list[dict[str, Any]], skip: int) -> float:
    """Median wall-clock seconds between consecutive step records after the first ``skip`` steps."""
    times = [r["time"] for r in history if "time" in r][skip:]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2]


# --------------------------------------------------------------------------- 1 + 2: throughput, Ray overhead


def bench_throughput_and_overhead(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llmstack.config import WorkersConfig, LoopConfig
    from llmstack.models import preset_config
    from llmstack.train.driver import ensure_ray, run_training
    from llmstack.train.loop import LocalSession, run_worker_loop

    torch.set_num_threads(1)  # same as one Ray worker with cpus_per_worker=1
    peak = matmul_peak_flops()
    vocab, seq = 4096, args.seq
    data = _data(vocab, args.micro * (args.steps + 1), seq)
    training = LoopConfig(max_steps=args.steps, micro_batch_size=args.micro, warmup_steps=1,
                              checkpoint_every=0, eval_every=10_000)
    fpt, n_params = flops_per_token(preset_config(args.preset, vocab_size=vocab, max_seq_len=seq), seq)
    tokens_per_step = args.micro * (seq - 1)

    def plain_run() -> float:
        session = LocalSession()
        run_worker_loop(_spec(args.preset, vocab, seq), data, None, training, session=session)
        return _steady_interval(session.records, args.skip)

    # Plain runs before and after the Ray run; the faster one is the baseline (this machine is shared,
    # so the slower one mostly measures other people's load).
    plain_runs = [plain_run()]

    ensure_ray(WorkersConfig(num_workers=1))
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        started = time.perf_counter()
        outcome = run_training(_spec(args.preset, vocab, seq), data, None, training=training,
                               scaling=WorkersConfig(num_workers=1), run_name="overhead", storage=tmp,
                               progress=False)
        ray_wall = time.perf_counter() - started
        ray_step = _steady_interval(outcome.history, args.skip)
        outcome.cleanup()
    plain_runs.append(plain_run())
    plain = min(plain_runs)
    peak = max(peak, matmul_peak_flops())  # the best of two measurements: other load only lowers it

    def throughput(interval: float) -> dict[str, float]:
        tps = tokens_per_step / interval
        return {"step_s": interval, "tokens_per_s": tps, "model_flops_per_s": tps * fpt, "mfu": tps * fpt / peak}

    return {
        "preset": args.preset, "parameters": n_params, "seq_len": seq, "micro_batch": args.micro,
        "steps": args.steps, "measured_steps": args.steps - args.skip - 1, "threads": 1,
        "flops_per_token": fpt, "matmul_peak_flops": peak,
        "plain_torch": throughput(plain), "plain_torch_step_s_runs": plain_runs, "ray_train": throughput(ray_step),
        "ray_overhead_ratio": ray_step / plain, "ray_total_wall_s_including_startup": ray_wall,
    }


# --------------------------------------------------------------------------- 3: activation checkpointing


_AC_CHILD = r"""
import json, os, sys, time, torch
from llmstack.config import LoopConfig
from llmstack.train.loop import LocalSession, run_worker_loop, LoopSpec
from llmstack.train.driver import build_preset_model
import functools
torch.set_num_threads(1)
preset, seq, micro, steps, ac = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

factory = functools.partial(build_preset_model, preset, vocab_size=4096, max_seq_len=seq, seed=0)
baseline = {}
def measuring_factory():
    model = factory()
    # Params exist now; grads and AdamW moments (3x params) come at the first step, activations on top.
    baseline["rss"] = status("VmRSS:")
    baseline["params"] = sum(p.numel() * 4 for p in model.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark
    return model
g = torch.Generator().manual_seed(0)
data = {"input_ids": torch.randint(0, 4096, (micro * (steps + 1), seq), generator=g)}
session = LocalSession()
run_worker_loop(LoopSpec(model_factory=measuring_factory), data, None,
                LoopConfig(max_steps=steps, micro_batch_size=micro, warmup_steps=1, checkpoint_every=0,
                               eval_every=10_000, activation_checkpointing=ac), session=session)
times = [r["time"] for r in session.records]
gaps = sorted(b - a for a, b in zip(times[1:], times[2:]))
peak = status("VmHWM:")
print(json.dumps({"peak_above_baseline_bytes": peak - baseline["rss"], "param_bytes": baseline["params"],
                  "state_bytes": 4 * baseline["params"], "step_s": gaps[len(gaps) // 2]}))
"""


def bench_activation_checkpointing(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name, flag in (("off", "0"), ("on", "1")):
        proc = subprocess.run([sys.executable, "-c", _AC_CHILD, args.ac_preset, str(args.ac_seq), str(args.ac_micro),
                               str(args.ac_steps), flag], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        # Activations = peak above baseline minus grads + AdamW moments (3x params, same in both).
        results[name]["activation_bytes_est"] = results[name]["peak_above_baseline_bytes"] - 3 * results[name]["param_bytes"]
    return {
        "preset": args.ac_preset, "seq_len": args.ac_seq, "micro_batch": args.ac_micro,
        "off": results["off"], "on": results["on"],
        "peak_ratio_on_vs_off": results["on"]["peak_above_baseline_bytes"] / results["off"]["peak_above_baseline_bytes"],
        "activation_ratio_on_vs_off": results["on"]["activation_bytes_est"] / max(1, results["off"]["activation_bytes_est"]),
        "step_time_ratio_on_vs_off": results["on"]["step_s"] / results["off"]["step_s"],
    }


# --------------------------------------------------------------------------- 4: FSDP vs DDP memory


def _memory_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: wrap, one optimizer step, count the bytes this rank holds."""
    import torch

    from llmstack.config import LoopConfig
    from llmstack.train import parallel
    from llmstack.train.driver import build_preset_model
    from llmstack.train.loop import build_optimizer, causal_lm_loss

    torch.set_num_threads(1)
    rank, _ = parallel.world()

    def local_bytes(tensor: Any) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    model = build_preset_model(config["preset"], vocab_size=4096, max_seq_len=config["seq"], seed=0)
    model = parallel.wrap_model(model, strategy=config["strategy"], device=torch.device("cpu"))
    optimizer = build_optimizer(model, LoopConfig())
    g = torch.Generator().manual_seed(rank)
    batch = {"input_ids": torch.randint(0, 4096, (config["micro"], config["seq"]), generator=g)}
    causal_lm_loss(model, batch).backward()
    optimizer.step()
    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"rank": rank, "param_bytes": params, "grad_bytes": grads, "optimizer_bytes": states,
            "param_grad_optimizer_bytes": params + grads + states, "peak_rss_bytes": hwm}


def bench_fsdp_vs_ddp(args: argparse.Namespace) -> dict[str, Any]:
    from ray.train import RunConfig, WorkersConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    results = {}
    with tempfile.TemporaryDirectory(prefix="train-bench-mem-") as tmp:
        for strategy in ("ddp", "fsdp"):
            trainer = TorchTrainer(
                _memory_worker,
                train_loop_config={"strategy": strategy, "preset": args.mem_preset, "seq": 128, "micro": 2},
                torch_config=TorchConfig(backend="gloo"),
                scaling_config=WorkersConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"mem-{strategy}", storage_path=tmp))
            results[strategy] = trainer.fit().return_value
    ddp, fsdp = results["ddp"], results["fsdp"]
    return {"preset": args.mem_preset, "workers": 2, "ddp": ddp, "fsdp": fsdp,
            "param_grad_optimizer_ratio_fsdp_vs_ddp": fsdp["param_grad_optimizer_bytes"] / ddp["param_grad_optimizer_bytes"],
            "peak_rss_ratio_fsdp_vs_ddp": fsdp["peak_rss_bytes"] / ddp["peak_rss_bytes"]}


# --------------------------------------------------------------------------- 5: llmstack vs transformers.Trainer


def _model_factory(source: str, vocab: int, seq: int) -> Any:
    """A picklable factory of the fp32 model to train: a seeded preset, or a pretrained HF directory."""
    if source in _presets():
        from llmstack.train.driver import build_preset_model

        return functools.partial(build_preset_model, source, vocab_size=vocab, max_seq_len=seq, seed=0)
    import torch
    from transformers import AutoModelForCausalLM

    return functools.partial(AutoModelForCausalLM.from_pretrained, source, dtype=torch.float32)


def _presets() -> tuple[str, ...]:
    from llmstack.models import PRESETS

    return tuple(PRESETS)


def _vocab_of(source: str) -> int:
    if source in _presets():
        return 4096
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(source).vocab_size)


def _vs_training(job: dict[str, Any]) -> Any:
    """Settings both sides share: constant LR, no weight decay (Trainer and llmstack pick the decayed
    parameters differently), clipping at 1.0, AdamW betas (0.9, 0.95), eps 1e-8."""
    from llmstack.config import LoopConfig

    return LoopConfig(max_steps=job["steps"], micro_batch_size=job["micro"], learning_rate=job["lr"],
                          warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0,
                          precision=job["precision"], checkpoint_every=0, eval_every=10_000, seed=0)


def _block_order(job: dict[str, Any]) -> Any:
    """Row indices in the order llmstack's sampler visits them (1 worker), for the Trainer's dataset."""
    import torch

    from llmstack.train.sharding import BlockSampler

    sampler = BlockSampler(job["blocks"], world_size=1, rank=0, per_step=job["micro"], seed=0)
    return torch.cat([sampler.step_indices(step) for step in range(job["steps"])])


def _run_llmstack(job: dict[str, Any], data: dict[str, Any], tmp: str) -> dict[str, Any]:
    from llmstack.config import WorkersConfig
    from llmstack.train.driver import run_training
    from llmstack.train.loop import LoopSpec

    spec = LoopSpec(model_factory=_model_factory(job["source"], job["vocab"], job["seq"]))
    scaling = WorkersConfig(num_workers=1, cpus_per_worker=job["threads"])
    outcome = run_training(spec, data, None, training=_vs_training(job), scaling=scaling,
                           run_name=f"vs-{job['tag']}-{time.time_ns()}", storage=tmp, progress=False)
    outcome.cleanup()
    history = outcome.history
    times = [r["time"] for r in history]
    return {"step_s": steady_median([b - a for a, b in zip(times, times[1:])], job["skip"]),
            "cpu_s": steady_median([r.get("step_cpu_s", float("nan")) for r in history][1:], job["skip"]),
            "losses": [r["loss"] for r in history]}


_TRAINER_CHILD = r"""
import json, os, sys, time
job = json.loads(sys.argv[1])
import torch
torch.set_num_threads(job["threads"])
sys.path.insert(0, job["bench_dir"])
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments
import train_bench

ids = load_file(job["data"])["input_ids"][train_bench._block_order(job)]

class Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return len(ids)
    def __getitem__(self, i):
        return {"input_ids": ids[i], "labels": ids[i]}

class InOrder(Trainer):  # the blocks are already in llmstack's order
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

marks = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        marks.append(("begin", time.perf_counter(), time.process_time()))
    def on_step_end(self, args, state, control, **kwargs):
        marks.append(("end", time.perf_counter(), time.process_time()))

model = train_bench._model_factory(job["source"], job["vocab"], job["seq"])()
training = train_bench._vs_training(job)
args = TrainingArguments(
    output_dir=job["out"], per_device_train_batch_size=job["micro"], max_steps=job["steps"],
    learning_rate=training.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=training.grad_clip,
    bf16=job["precision"] == "bf16", use_cpu=True, save_strategy="no", report_to=[], logging_steps=1,
    dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=0)
trainer = InOrder(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()])
trainer.train()
ends = [m for m in marks if m[0] == "end"]
begins = [m for m in marks if m[0] == "begin"]
print("RESULT " + json.dumps({
    "step_gaps": [b[1] - a[1] for a, b in zip(ends, ends[1:])],
    "cpu": [e[2] - b[2] for b, e in zip(begins, ends)],
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h],
    "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    "fused": bool(getattr(trainer.optimizer, "defaults", {}).get("fused")),
    "attn": getattr(model.config, "_attn_implementation", None)}))
"""


def _run_trainer(job: dict[str, Any], tmp: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(job["threads"]), TOKENIZERS_PARALLELISM="false")
    child = {**job, "bench_dir": str(ROOT), "out": str(Path(tmp) / "trainer-out")}
    proc = subprocess.run([sys.executable, "-c", _TRAINER_CHILD, json.dumps(child)], capture_output=True,
                          text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"Trainer run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    raw = json.loads(lines[-1][len("RESULT "):])
    return {"step_s": steady_median(raw["step_gaps"], job["skip"]), "cpu_s": steady_median(raw["cpu"][1:], job["skip"]),
            "losses": raw["losses"], "optimizer": raw["optimizer"], "fused": raw["fused"], "attn": raw["attn"]}


def bench_vs_trainer(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from llmstack.config import WorkersConfig
    from llmstack.train.driver import ensure_ray

    sources = list(args.vs_presets) + ([str(Path(args.model).expanduser())] if args.model else [])
    ensure_ray(WorkersConfig(num_workers=1, cpus_per_worker=args.threads))
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="train-vs-trainer-") as tmp:
        jobs = []
        for source in sources:
            vocab = _vocab_of(source)
            micro = args.vs_micro if source in _presets() else args.model_micro
            steps = args.vs_steps if source in _presets() else args.model_steps
            g = torch.Generator().manual_seed(0)
            data = {"input_ids": torch.randint(0, vocab, (micro * steps, args.seq), generator=g)}
            data_file = str(Path(tmp) / f"data-{len(jobs)}.safetensors")
            save_file(data, data_file)
            for precision in args.precisions:
                name = f"{Path(source).name if source not in _presets() else source} {precision}"
                jobs.append(({"source": source, "vocab": vocab, "seq": args.seq, "micro": micro, "steps": steps,
                              "skip": args.skip, "blocks": micro * steps, "precision": precision,
                              "threads": args.threads, "lr": args.vs_lr, "data": data_file,
                              "tag": f"{len(jobs)}"}, data, name))
        for round_index in range(args.rounds):
            for job, data, name in jobs:
                case = cases.setdefault(name, {"source": job["source"], "precision": job["precision"],
                                               "micro_batch": job["micro"], "seq_len": job["seq"],
                                               "steps": job["steps"], "llmstack": [], "trainer": []})
                order = ("llmstack", "trainer") if round_index % 2 == 0 else ("trainer", "llmstack")
                for side in order:
                    started = time.perf_counter()
                    run = (_run_llmstack(job, data, tmp) if side == "llmstack" else _run_trainer(job, tmp))
                    run["wall_s"] = time.perf_counter() - started
                    case[side].append(run)
                    tokens = job["micro"] * job["seq"]
                    print(f"[vs-trainer] round {round_index} {name} {side}: {tokens / run['step_s']:.0f} tok/s wall, "
                          f"{tokens / run['cpu_s']:.0f} tok/s CPU", flush=True)
    for name, case in cases.items():
        tokens = case["micro_batch"] * case["seq_len"]
        for side in ("llmstack", "trainer"):
            runs = case[side]
            case[f"{side}_tokens_per_s"] = tokens / statistics.median(r["step_s"] for r in runs)
            case[f"{side}_tokens_per_cpu_s"] = tokens / statistics.median(r["cpu_s"] for r in runs)
        case["ratio_wall"] = case["llmstack_tokens_per_s"] / case["trainer_tokens_per_s"]
        case["ratio_cpu"] = case["llmstack_tokens_per_cpu_s"] / case["trainer_tokens_per_cpu_s"]
        ours, theirs = case["llmstack"][0]["losses"], case["trainer"][0]["losses"]
        case["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))
        case["trainer_optimizer"] = {k: case["trainer"][0][k] for k in ("optimizer", "fused", "attn")}
    return {"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds, "skip": args.skip,
            "learning_rate": args.vs_lr, "cases": cases}


def plot_vs_trainer(results: dict[str, Any], path: Path) -> None:
    cases = results["cases"]
    names = list(cases)
    figure = new_figure(figsize=(max(6.0, 2.2 * len(names)), 3.8), dpi=110)
    axis = figure.subplots(1, 1)
    width = 0.38
    xs = range(len(names))
    axis.bar([x - width / 2 for x in xs], [cases[n]["llmstack_tokens_per_s"] for n in names], width,
             label="llmstack (1 Ray Train worker)")
    axis.bar([x + width / 2 for x in xs], [cases[n]["trainer_tokens_per_s"] for n in names], width,
             label="transformers.Trainer")
    for x, n in zip(xs, names):
        top = max(cases[n]["llmstack_tokens_per_s"], cases[n]["trainer_tokens_per_s"])
        axis.text(x, top * 1.02, f"{cases[n]['ratio_wall']:.2f}x wall\n{cases[n]['ratio_cpu']:.2f}x CPU",
                  ha="center", fontsize=8)
    axis.set_xticks(list(xs), names, fontsize=8)
    axis.set_ylabel("tokens/s")
    axis.set_ylim(0, 1.3 * max(max(c["llmstack_tokens_per_s"], c["trainer_tokens_per_s"]) for c in cases.values()))
    axis.set_title(f"training tokens/s, {results['threads']} thread(s), {results['cpu']}", fontsize=9)
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path)


def vs_trainer_markdown(results: dict[str, Any]) -> str:
    lines = [f"CPU: {results['cpu']}; {results['threads']} thread(s) each side; {results['rounds']} interleaved "
             f"rounds; medians after {results['skip']} warm-up steps.", ""]
    lines += markdown_table(
        ["model, precision", "batch", "llmstack tok/s", "Trainer tok/s", "ratio (wall)", "ratio (CPU time)",
         "max loss diff"],
        [[name, f"{c['micro_batch']} x {c['seq_len']}", f"{c['llmstack_tokens_per_s']:.0f}",
          f"{c['trainer_tokens_per_s']:.0f}", f"**{c['ratio_wall']:.2f}x**", f"{c['ratio_cpu']:.2f}x",
          f"{c['loss_max_abs_diff']:.2g}"] for name, c in results["cases"].items()], align="llrrrrr")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots and main


def plot(results: dict[str, Any]) -> None:
    figure = new_figure(figsize=(11, 3.4), dpi=110)
    a, b, c = figure.subplots(1, 3)
    t = results["throughput"]
    a.bar(["plain torch", "Ray Train"], [t["plain_torch"]["tokens_per_s"], t["ray_train"]["tokens_per_s"]])
    a.set_title(f"tokens/s ({t['preset']}, 1 worker)\nRay/plain step time {t['ray_overhead_ratio']:.2f}x")
    ac = results["activation_checkpointing"]
    mib = 1024 * 1024
    b.bar(["AC off", "AC on"], [ac["off"]["peak_above_baseline_bytes"] / mib, ac["on"]["peak_above_baseline_bytes"] / mib])
    b.set_title(f"peak MiB above baseline ({ac['preset']})\nstep time on/off {ac['step_time_ratio_on_vs_off']:.2f}x")
    m = results["fsdp_vs_ddp"]
    c.bar(["DDP", "FSDP"], [m["ddp"]["param_grad_optimizer_bytes"] / mib, m["fsdp"]["param_grad_optimizer_bytes"] / mib])
    c.set_title(f"params+grads+Adam MiB/worker\nFSDP/DDP {m['param_grad_optimizer_ratio_fsdp_vs_ddp']:.2f}x")
    figure.tight_layout()
    figure.savefig(RESULTS / "train_bench.png")


def markdown(results: dict[str, Any]) -> str:
    """The ``## train`` section of benchmarks/RESULTS.md."""
    t, ac, m = results["throughput"], results["activation_checkpointing"], results["fsdp_vs_ddp"]
    mib = 1024 * 1024
    load = results["machine"]
    lines = [
        "## train", "",
        f"Reproduce: `{results['command'].strip()}` ({results['wall_s']:.0f} s on {load['cpus']} CPU cores, "
        f"torch {load['torch']}, Ray {load['ray']}; load average {load['load_avg_at_start'][0]:.1f} at start and "
        f"{load['load_avg_at_end'][0]:.1f} at end: the machine was shared with other jobs, so step times are noisy). "
        "Raw numbers: `benchmarks/results/train.json`; plot: `benchmarks/results/train_bench.png`.", "",
        f"**Throughput, MFU and Ray Train overhead** — `{t['preset']}` preset ({t['parameters'] / 1e6:.2f}M parameters), "
        f"{t['micro_batch']} x {t['seq_len']} tokens per step, 1 worker / 1 thread, median step-to-step wall time over "
        f"{t['measured_steps']} steady-state steps (start-up excluded). FLOPs/token = 6N + 12·L·d·T = "
        f"{t['flops_per_token'] / 1e6:.2f} MFLOP (N without the embedding lookup); peak = best fp32 1024² matmul on "
        f"1 thread, measured before and after the loops: {t['matmul_peak_flops'] / 1e9:.1f} GFLOP/s.", "",
    ]
    loops = (("plain torch (run_worker_loop in-process)", t["plain_torch"]), ("Ray Train (run_training, 1 worker)", t["ray_train"]))
    lines += markdown_table(["loop", "s/step", "tokens/s", "model TFLOP/s", "MFU"],
                            [[name, f"{row['step_s']:.3f}", f"{row['tokens_per_s']:.0f}",
                              f"{row['model_flops_per_s'] / 1e12:.4f}", f"{row['mfu']:.1%}"] for name, row in loops])
    plain_runs = ", ".join(f"{x:.3f}" for x in t.get("plain_torch_step_s_runs", []))
    verdict = "met" if t["ray_overhead_ratio"] <= 1.15 else "**not met**"
    lines += ["", f"Ray Train / plain step time: **{t['ray_overhead_ratio']:.2f}x** (target <= 1.15x: {verdict}). "
              f"Plain baseline = faster of the runs before and after the Ray run ({plain_runs} s/step).", "",
              f"**Activation checkpointing** — `{ac['preset']}` preset, {ac['micro_batch']} x {ac['seq_len']} tokens, "
              "1 thread, each setting in a fresh process; peak RSS above the post-init baseline (grads and AdamW "
              "moments, 3x the parameter bytes, are in both; the rest is activations and temporaries).", ""]
    lines += markdown_table(["setting", "peak above baseline MiB", "activations (est.) MiB", "s/step"],
                            [[f"AC {name}", f"{ac[name]['peak_above_baseline_bytes'] / mib:.0f}",
                              f"{ac[name]['activation_bytes_est'] / mib:.0f}", f"{ac[name]['step_s']:.2f}"]
                             for name in ("off", "on")])
    lines += ["", f"On vs off: activations **{ac['activation_ratio_on_vs_off']:.2f}x**, whole peak "
              f"{ac['peak_ratio_on_vs_off']:.2f}x, step time **{ac['step_time_ratio_on_vs_off']:.2f}x** "
              "(expected: a large memory cut for about a third more compute).", "",
              f"**FSDP vs DDP** — `{m['preset']}` preset, 2 Ray Train workers (gloo), one optimizer step; bytes held by "
              "rank 0 (local shards under FSDP2).", ""]
    lines += markdown_table(["strategy", "params MiB", "grads MiB", "AdamW state MiB", "total MiB", "peak RSS MiB"],
                            [[name.upper(), *(f"{m[name][key] / mib:.0f}" for key in (
                                "param_bytes", "grad_bytes", "optimizer_bytes", "param_grad_optimizer_bytes",
                                "peak_rss_bytes"))] for name in ("ddp", "fsdp")])
    ratio = m["param_grad_optimizer_ratio_fsdp_vs_ddp"]
    lines += ["", f"FSDP / DDP parameter + gradient + optimizer memory per worker: **{ratio:.2f}x** "
              f"(target <= 0.6x: {'met' if ratio <= 0.6 else '**not met**'}). Whole-process peak RSS "
              f"{m['peak_rss_ratio_fsdp_vs_ddp']:.2f}x: on this small model the ~1 GiB of torch/transformers/Ray "
              "runtime and the full model each worker builds before sharding dominate it.", ""]
    return "\n".join(lines)


def _without_only(argv: list[str]) -> list[str]:
    """The command line minus ``--only ...`` (RESULTS.md shows how to reproduce everything)."""
    kept, skipping = [], False
    for item in argv:
        if item == "--only":
            skipping = True
        elif skipping and not item.startswith("--"):
            continue
        else:
            skipping = False
            kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="preset for throughput and Ray overhead")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the step time")
    parser.add_argument("--ac-preset", default="small")
    parser.add_argument("--ac-seq", type=int, default=256)
    parser.add_argument("--ac-micro", type=int, default=4)
    parser.add_argument("--ac-steps", type=int, default=4)
    parser.add_argument("--mem-preset", default="small")
    parser.add_argument("--only", nargs="*", choices=["throughput", "activation_checkpointing", "fsdp_vs_ddp"],
                        help="rerun these parts, keeping the others from the existing results file")
    vs = parser.add_argument_group("--vs-trainer: llmstack (1 worker) vs transformers.Trainer")
    vs.add_argument("--vs-trainer", action="store_true", help="run only this comparison")
    vs.add_argument("--model", help="a pretrained HF model directory to compare on too (continued pretraining)")
    vs.add_argument("--vs-presets", nargs="*", default=["small"])
    vs.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    vs.add_argument("--rounds", type=int, default=2)
    vs.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    vs.add_argument("--vs-micro", type=int, default=4)
    vs.add_argument("--vs-steps", type=int, default=8)
    vs.add_argument("--model-micro", type=int, default=2)
    vs.add_argument("--model-steps", type=int, default=6)
    vs.add_argument("--vs-lr", type=float, default=1e-4)
    vs.add_argument("--vs-name", default="train_vs_trainer", help="results/<name>.json and .png")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.vs_trainer:
        started = time.perf_counter()
        results = bench_vs_trainer(args)
        import torch
        import transformers

        results.update(command="python benchmarks/train_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       wall_s=time.perf_counter() - started, torch=torch.__version__,
                       transformers=transformers.__version__, cpus=os.cpu_count(), load_avg_at_end=os.getloadavg())
        write_json(RESULTS / f"{args.vs_name}.json", results, indent=2, default=str, newline=True)
        plot_vs_trainer(results, RESULTS / f"{args.vs_name}.png")
        print(vs_trainer_markdown(results))
        return 0
    import ray
    import torch

    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "load_avg_at_start": os.getloadavg()},
        "command": "python benchmarks/train_bench.py " + " ".join(_without_only(argv if argv is not None else sys.argv[1:])),
        "part_wall_s": {},
    }
    previous = json.loads((RESULTS / "train.json").read_text()) if args.only and (RESULTS / "train.json").is_file() else {}
    for key, bench in (("throughput", bench_throughput_and_overhead),
                       ("activation_checkpointing", bench_activation_checkpointing),
                       ("fsdp_vs_ddp", bench_fsdp_vs_ddp)):
        if args.only and key not in args.only and key in previous:
            results[key] = previous[key]
            results["part_wall_s"][key] = previous.get("part_wall_s", {}).get(key, 0.0)
            continue
        t0 = time.perf_counter()
        results[key] = bench(args)
        results["part_wall_s"][key] = time.perf_counter() - t0
        print(f"[{key}] {time.perf_counter() - t0:.0f} s: {json.dumps(results[key], default=str)[:400]}", flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results["wall_s"] = sum(results["part_wall_s"].values()) or time.perf_counter() - started
    write_json(RESULTS / "train.json", results, indent=2, default=str, newline=True)
    plot(results)
    write_section("train", markdown(results))
    print(f"wrote {RESULTS / 'train.json'} and the train section of RESULTS.md in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
