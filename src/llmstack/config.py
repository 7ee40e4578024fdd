"""Typed configuration for every stage, read from YAML or dicts, written back to YAML.

Each stage has a small dataclass whose fields carry a docstring-style comment. Parsing walks
the type hints, so unknown keys, wrong types and out-of-range values are *all* collected and
reported together, each with its key path (``training.micro_batch_size: must be >= 1, got 0``).

Example:
    >>> cfg = load_config(TrainConfig, {"training": {"max_steps": 10}}, ["scaling.num_workers=1"])
    >>> cfg.scaling.num_workers
    1

One module on purpose (~600 lines): the parser walks every stage's dataclass, and users look for
all the knobs of the YAML in one place; each stage's class stays small.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from llmstack.errors import ConfigError

C = TypeVar("C")
Problems = list[tuple[str, str]]  # (field name or dotted sub-path, message)

PRESET_NAMES = ("tiny", "small", "base")
# dynamic-int8: the old torch.ao.quantization method, kept as an alias that runs as int8-dynamic (torchao)
QUANTIZE_METHODS = ("int8", "nf4", "fp4", "smoothquant", "w8a8", "int8-weight-only", "int8-dynamic",
                    "int4-weight-only", "dynamic-int8")
FINETUNE_METHODS = ("lora", "qlora", "dora", "bitfit", "full")
# vLLM AsyncEngineArgs that engine: vllm sets from ServeConfig keys (so vllm_engine_kwargs may not)
VLLM_ARGS_SET_BY = {"model": "model", "tokenizer": "model", "dtype": "vllm_dtype",
                    "max_model_len": "vllm_max_model_len", "kv_cache_memory_bytes": "vllm_kv_cache_gb",
                    "enforce_eager": "vllm_enforce_eager", "max_num_seqs": "max_batch_size",
                    "max_loras": "max_adapters_per_replica", "max_cpu_loras": "max_adapters_per_replica",
                    "enable_lora": "adapters", "enable_prefix_caching": "prefix_cache_mb"}


# --------------------------------------------------------------------------- stage configs


@dataclass
class ModelConfig:
    preset: str = "tiny"  # architecture preset: tiny | small | base (ignored when source is set)
    source: str | None = None  # registry ref (name@v3), local HF directory or hub id
    vocab_size: int | None = None  # None: take it from the tokenizer
    max_seq_len: int | None = None  # None: the preset's context length
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype when loading

    def check(self) -> Problems:
        problems: Problems = []
        if self.source is None and self.preset not in PRESET_NAMES:
            problems.append(("preset", f"unknown preset {self.preset!r}; known: {', '.join(PRESET_NAMES)}"))
        _at_least(problems, self, "vocab_size", 16)
        _at_least(problems, self, "max_seq_len", 8)
        return problems


@dataclass
class DataConfig:
    source: str = "builtin:stdlib"  # builtin:<name>, or a path/fsspec URL (.txt, .jsonl, .parquet, datasets dir)
    text_field: str = "text"  # column holding the text in jsonl/parquet/datasets sources
    tokenizer: str | None = None  # registry ref or directory; None: train a BPE tokenizer on the data
    vocab_size: int = 4096  # size of a freshly trained tokenizer
    block_size: int = 128  # tokens per packed training block
    eval_fraction: float = 0.05  # share of blocks held out for evaluation
    max_documents: int | None = None  # cap on documents read (None: all)
    seed: int = 0  # seed of the train/eval split
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (e.g. endpoint_url)

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "vocab_size", 64)
        _at_least(problems, self, "block_size", 8)
        _at_least(problems, self, "max_documents", 1)
        if not 0.0 < self.eval_fraction < 0.5:
            problems.append(("eval_fraction", f"must be in (0, 0.5), got {self.eval_fraction}"))
        return problems


@dataclass
class InstructionDataConfig(DataConfig):
    """Fine-tuning data: DataConfig plus how rows become chats and which tokens are learned."""

    # {canonical field: column} renames before the row format is recognized, e.g. {prompt: question, response: answer}
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None  # None: the tokenizer's own; chatml or llmstack, a Jinja file or Jinja text
    train_on_inputs: bool = False  # learn every token (prompts too), not only the assistant's answers

    def check(self) -> Problems:
        from llmstack.data.formats import check_columns

        problems = super().check()
        problems += [("columns", problem) for problem in check_columns(self.columns)]
        if self.chat_template is not None:
            from llmstack.data.chat_templates import TEMPLATE_NAMES

            value = self.chat_template
            if not (value in TEMPLATE_NAMES or "{{" in value or "{%" in value or Path(value).expanduser().is_file()):
                problems.append(("chat_template", f"{value!r} is neither a known template "
                                                  f"({', '.join(TEMPLATE_NAMES)}) nor an existing Jinja file"))
        return problems


@dataclass
class TrainingConfig:
    max_steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # blocks per worker per forward pass
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    learning_rate: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay (not applied to norms)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; master weights stay fp32
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    eval_every: int = 50  # steps between evaluations
    eval_batches: int = 8  # micro-batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints; 0 disables
    num_to_keep: int = 2  # checkpoints kept in storage
    seed: int = 0  # model init, data order, dropout

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_every", "eval_batches", "num_to_keep"):
            _at_least(problems, self, name, 1)
        for name in ("warmup_steps", "checkpoint_every"):
            _at_least(problems, self, name, 0)
        if not self.learning_rate > 0:
            problems.append(("learning_rate", f"must be > 0, got {self.learning_rate}"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if self.grad_clip < 0:
            problems.append(("grad_clip", f"must be >= 0, got {self.grad_clip}"))
        return problems


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers
    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallel, or FSDP2 sharding per decoder layer
    use_gpu: bool = False  # one GPU per worker (nccl); CPU workers use gloo
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    max_failures: int = 0  # worker failures tolerated before the run fails
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a bounded local cluster
    price_per_worker_hour: float | None = None  # $ per worker-hour (its share of an instance); set: runs record cost_usd

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "num_workers", 1)
        _at_least(problems, self, "max_failures", -1)
        if not self.cpus_per_worker > 0:
            problems.append(("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}"))
        if self.price_per_worker_hour is not None and not self.price_per_worker_hour > 0:
            problems.append(("price_per_worker_hour", f"must be > 0, got {self.price_per_worker_hour}"))
        return problems


@dataclass
class TrainConfig:
    name: str = "tiny-lm"  # registry name of the trained model, also the run name
    registry: str | None = None  # registry URL; None: LLMSTACK_REGISTRY or ~/.llmstack/registry
    storage_path: str | None = None  # checkpoint storage (path or fsspec URL); None: <registry>/../runs
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for storage_path (endpoint_url, key, secret)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


@dataclass
class LoRAConfig:
    method: str = "lora"  # lora | qlora | dora | bitfit | full
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # scaling numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] | None = None  # None: every linear layer of the decoder
    merge: bool = False  # also register a merged full model

    def check(self) -> Problems:
        problems: Problems = []
        if self.method not in FINETUNE_METHODS:
            problems.append(("method", f"unknown method {self.method!r}; known: {', '.join(FINETUNE_METHODS)}"))
        _at_least(problems, self, "rank", 1)
        if not self.alpha > 0:
            problems.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        return problems


@dataclass
class FinetuneConfig:
    name: str = "tiny-lm-lora"  # registry name of the adapter
    base: str | None = None  # registry ref, local HF directory or hub id of the base model
    registry: str | None = None  # registry URL
    storage_path: str | None = None  # checkpoint storage
    data: InstructionDataConfig = field(
        default_factory=lambda: InstructionDataConfig(source="builtin:stdlib-qa", block_size=128))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(max_steps=100, learning_rate=1e-3, warmup_steps=10)
    )
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    packing: bool = False  # pack several instruction examples into each data.block_size row
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of storage_path


@dataclass
class QuantizeConfig:
    # int8-weight-only | int8-dynamic | int4-weight-only (torchao) | int8 (LLM.int8) | nf4 | fp4 | smoothquant | w8a8;
    # the default is the one measured most accurate at a speed gain on SmolLM2 (benchmarks/quantize_bench.py)
    method: str = "int8-weight-only"
    threshold: float = 6.0  # LLM.int8 outlier threshold
    block_size: int = 64  # 4-bit quantization block size (int4-weight-only: group size, 32 | 64 | 128)
    double_quant: bool = True  # 4-bit: quantize the quantization constants too
    alpha: float = 0.5  # SmoothQuant migration strength
    search_alpha: bool = False  # SmoothQuant: pick alpha on the calibration set
    calibration: str | None = None  # calibration data source; None: the built-in corpus
    calibration_samples: int = 32  # blocks used for calibration
    evaluate: bool = True  # measure perplexity, size and speed against the source
    kernel: Literal["int8", "fake-quant"] = "int8"  # smoothquant/w8a8 matmul: real torch._int_mm, or simulated in float
    smooth_outputs: bool = True  # SmoothQuant: also smooth v_proj->o_proj and up_proj->down_proj (exact for LLaMA)
    alpha_grid: list[float] | None = None  # SmoothQuant alphas tried by search_alpha (None: 0.3..0.8 step 0.1)
    # source load dtype; non-quantized parts and compute use it (None: the dtype the source is stored in)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    quantize_lm_head: bool = False  # torchao methods: quantize lm_head too (unties tied embeddings)
    keep_float: list[str] | None = None  # torchao methods: layer-name patterns left in float, e.g. ["*.mlp.gate_proj"]
    float_edge_layers: int = 1  # torchao int8 methods: first and last N decoder layers stay float (measured sensitive)
    int4_algorithm: Literal["hqq", "tinygemm"] = "hqq"  # int4-weight-only: how scales and zero points are chosen
    # int8-weight-only matmul: in the model's dtype (torchao's path), or bf16 activations on aten's int8 kernel (faster)
    weight_only_compute: Literal["model", "bfloat16"] = "model"
    eval_data: str | None = None  # held-out perplexity data; None: the source's training corpus, else builtin:stdlib
    eval_samples: int = 16  # held-out blocks for perplexity
    seq_len: int = 128  # tokens per calibration / evaluation block
    speed_prompt_tokens: int = 64  # prompt length for the prefill tokens/s measurement
    speed_new_tokens: int = 32  # greedy tokens for the decode tokens/s measurement (KV cache, batch 1)
    speed_repeats: int = 3  # timing repeats (the median is kept)

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("eval_samples", "seq_len", "speed_prompt_tokens", "speed_new_tokens", "speed_repeats"):
            _at_least(problems, self, name, 1)
        if self.alpha_grid is not None and (not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid)):
            problems.append(("alpha_grid", f"must be a non-empty list of values in [0, 1], got {self.alpha_grid}"))
        if self.method not in QUANTIZE_METHODS:
            problems.append(("method", f"unknown method {self.method!r}; known: {', '.join(QUANTIZE_METHODS)}"))
        if not self.threshold > 0:
            problems.append(("threshold", f"must be > 0, got {self.threshold}"))
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            problems.append(("block_size", f"must be a power of two in [32, 4096], got {self.block_size}"))
        elif self.method == "int4-weight-only" and self.block_size not in (32, 64, 128):
            problems.append(("block_size", f"int4-weight-only groups must be 32, 64 or 128, got {self.block_size}"))
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(("alpha", f"must be in [0, 1], got {self.alpha}"))
        _at_least(problems, self, "calibration_samples", 1)
        _at_least(problems, self, "float_edge_layers", 0)
        return problems


@dataclass
class AutoscalingConfig:
    min_replicas: int = 1  # replicas kept when idle
    max_replicas: int = 1  # upper bound under load
    target_ongoing_requests: float = 4.0  # per-replica queue depth the autoscaler aims for
    upscale_delay_s: float = 2.0  # sustained load before adding replicas (reactive)
    downscale_delay_s: float = 10.0  # sustained idleness before removing replicas (reactive)
    look_back_period_s: float = 10.0  # window the queue-depth metric is averaged over
    metrics_interval_s: float = 1.0  # how often handles and replicas report queue depth
    policy: Literal["reactive", "predictive"] = "reactive"  # Serve's queue-depth policy, or llmstack's forecast
    ttft_slo_s: float = 1.0  # predictive: the time-to-first-token objective the capacity is measured at
    capacity_tokens_per_s: float = 10_000.0  # predictive: prompt+output tokens/s one replica sustains within the SLO
    capacity_requests_per_s: float | None = None  # predictive: requests/s one replica sustains (None: tokens only)
    headroom: float = 0.2  # predictive: spare capacity on top of the forecast (0.2 = 20%)
    forecast_bin_s: float = 2.0  # predictive: the rate series' step (counters are differenced this often)
    forecast_horizon_s: float = 10.0  # predictive: how far ahead to provision (cover a replica's start-up)
    season_s: float | None = None  # predictive: seasonal period; used once two periods of history exist
    upscale_cooldown_s: float = 0.0  # predictive: least time between two scale-ups
    downscale_stable_s: float = 20.0  # predictive: how long the lower demand must hold before scaling down
    downscale_cooldown_s: float = 30.0  # predictive: least time from any scale event to a scale-down
    hysteresis: float = 0.15  # predictive: a scale-down needs demand below (replicas - 1) * (1 - hysteresis)
    forecast_alpha: float = 0.5  # predictive: Holt-Winters level smoothing
    forecast_beta: float = 0.3  # predictive: Holt-Winters trend smoothing
    forecast_phi: float = 0.9  # predictive: trend damping (1: undamped; lower: a burst's first slope fades sooner)
    backlog_source: Literal["ongoing", "queued"] = "ongoing"  # predictive: queue term from all ongoing requests
    # beyond target_ongoing_requests per replica, or only from those queued at handles (the ones a new replica can take)
    reserve_window_s: float = 0.0  # predictive: keep the reserve_quantile of the demand of this much history (0: off)
    reserve_quantile: float = 0.9  # predictive: that quantile (of per-bin demand, idle bins included)
    metrics_url: str | None = None  # predictive: the app's base URL; its /metrics gives arrival and token counters

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "min_replicas", 0)
        _at_least(problems, self, "max_replicas", 1)
        if self.max_replicas < self.min_replicas:
            problems.append(("max_replicas", f"must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}"))
        if not self.target_ongoing_requests > 0:
            problems.append(("target_ongoing_requests", f"must be > 0, got {self.target_ongoing_requests}"))
        for name in ("upscale_delay_s", "downscale_delay_s", "headroom", "upscale_cooldown_s",
                     "downscale_stable_s", "downscale_cooldown_s"):
            _at_least(problems, self, name, 0)
        for name in ("look_back_period_s", "metrics_interval_s", "ttft_slo_s", "capacity_tokens_per_s",
                     "forecast_bin_s", "forecast_horizon_s"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("capacity_requests_per_s", "season_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append((name, f"must be > 0 or null, got {value}"))
        if not 0 <= self.hysteresis < 1:
            problems.append(("hysteresis", f"must be in [0, 1), got {self.hysteresis}"))
        for name in ("forecast_alpha", "forecast_beta", "forecast_phi", "reserve_quantile"):
            if not 0 < getattr(self, name) <= 1:
                problems.append((name, f"must be in (0, 1], got {getattr(self, name)}"))
        _at_least(problems, self, "reserve_window_s", 0)
        if self.policy == "predictive":
            if self.max_replicas <= self.min_replicas:
                problems.append(("max_replicas", f"policy predictive cannot scale between min_replicas "
                                 f"({self.min_replicas}) and max_replicas ({self.max_replicas}); "
                                 "make max_replicas larger or use policy: reactive"))
            if self.forecast_horizon_s < self.forecast_bin_s:
                problems.append(("forecast_horizon_s", f"must be >= forecast_bin_s ({self.forecast_bin_s}), "
                                 f"got {self.forecast_horizon_s}"))
            if self.season_s is not None and self.season_s < 2 * self.forecast_bin_s:
                problems.append(("season_s", f"must span at least two forecast bins "
                                 f"({2 * self.forecast_bin_s} s), got {self.season_s}"))
        return problems


@dataclass
class ServeConfig:
    model: str = "tiny-lm@production"  # registry ref (or local dir) of the served model
    registry: str | None = None  # registry URL
    model_aliases: list[str] = field(default_factory=list)  # other names accepted for the model (name@production)
    app_name: str = "llmstack"  # Ray Serve application name
    route_prefix: str = "/"  # HTTP route prefix
    host: str = "127.0.0.1"  # HTTP host for deploy()
    port: int = 8000  # HTTP port for deploy()
    api_key: str | None = None  # bearer key guarding every route but health; None: open
    adapters: list[str] = field(default_factory=list)  # adapter refs served on the same base
    max_adapters_per_replica: int = 4  # LRU bound on loaded adapters
    max_batch_size: int = 8  # @serve.batch max batch size; also the cap on sequences per decode step
    batch_wait_timeout_s: float = 0.01  # @serve.batch wait for a batch to fill
    max_ongoing_requests: int = 32  # per replica; must allow batches to fill
    max_queued_requests: int = 64  # beyond this the app sheds load with 503
    max_concurrent_batches: int = 32  # @serve.batch groups admitted at once; they join one decode loop
    retry_after_s: float = 1.0  # Retry-After sent with a shed (503) request
    response_cache_size: int = 256  # finished deterministic results kept per replica; 0 disables
    prefix_cache_mb: float = 64.0  # per replica: KV states of shared prompt prefixes (LRU); 0 disables
    default_max_tokens: int = 64  # when a request gives none
    max_tokens_limit: int = 512  # largest max_tokens accepted
    max_n: int = 4  # cap on choices per request
    max_body_bytes: int = 1_000_000  # larger bodies get 413
    request_timeout_s: float = 60.0  # generation is cancelled past this
    num_cpus: float = 1.0  # CPUs Ray reserves per model replica (placement); see num_threads for compute
    num_threads: int | None = None  # torch threads per replica; None: the node's cores shared by max_replicas
    num_gpus: float = 0.0  # GPUs Ray reserves per model replica (engine vllm on a GPU cluster; 0: CPU only)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    engine: Literal["transformers", "vllm"] = "transformers"  # what decodes: the embedded engine, or vLLM (extra)
    vllm_kv_cache_gb: float = 0.5  # engine vllm: memory for its paged KV cache per replica (RAM on CPU)
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # engine vllm: compute dtype; auto: the
    # model's stored dtype (float16 runs as bfloat16 on a CPU)
    vllm_max_model_len: int | None = None  # engine vllm: longest sequence (prompt + output); None: the model's
    # positions, cut to what vllm_kv_cache_gb holds
    vllm_enforce_eager: bool = True  # engine vllm: no torch.compile / CUDA graphs (fast start-up; GPUs: false)
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)  # engine vllm: more vLLM AsyncEngineArgs,
    # passed verbatim (e.g. block_size, swap_space); not those llmstack sets from the keys above
    graceful_shutdown_timeout_s: float = 5.0  # on SIGTERM/Ctrl-C/replica stop: how long live requests may finish
    # (new ones get 503); streams still running then end with an SSE error event and [DONE]

    def check(self) -> Problems:
        problems: Problems = []
        if not self.graceful_shutdown_timeout_s >= 0:
            problems.append(("graceful_shutdown_timeout_s", f"must be >= 0, got {self.graceful_shutdown_timeout_s}"))
        if not self.vllm_kv_cache_gb > 0:
            problems.append(("vllm_kv_cache_gb", f"must be > 0, got {self.vllm_kv_cache_gb}"))
        _at_least(problems, self, "vllm_max_model_len", 1)
        for key in sorted(set(self.vllm_engine_kwargs) & set(VLLM_ARGS_SET_BY)):
            problems.append((f"vllm_engine_kwargs.{key}", f"llmstack sets it from {VLLM_ARGS_SET_BY[key]}; set that "
                             "instead"))
        for name in ("max_batch_size", "max_ongoing_requests", "max_tokens_limit", "max_n", "default_max_tokens",
                     "max_adapters_per_replica", "max_body_bytes", "max_concurrent_batches"):
            _at_least(problems, self, name, 1)
        for name in ("retry_after_s", "response_cache_size", "prefix_cache_mb"):
            _at_least(problems, self, name, 0)
        if not self.request_timeout_s > 0:
            problems.append(("request_timeout_s", f"must be > 0, got {self.request_timeout_s}"))
        if not self.num_cpus >= 0:
            problems.append(("num_cpus", f"must be >= 0, got {self.num_cpus}"))
        if not self.num_gpus >= 0:
            problems.append(("num_gpus", f"must be >= 0, got {self.num_gpus}"))
        cores = os.cpu_count() or 1
        if self.num_threads is not None and not 1 <= self.num_threads <= cores:
            problems.append(("num_threads", f"must be in [1, {cores}] (this machine's cores), got {self.num_threads}"))
        _at_least(problems, self, "max_queued_requests", -1)
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append(("max_ongoing_requests",
                             f"must be >= max_batch_size ({self.max_batch_size}) so batches can fill"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be a TCP port, got {self.port}"))
        if self.batch_wait_timeout_s < 0:
            problems.append(("batch_wait_timeout_s", f"must be >= 0, got {self.batch_wait_timeout_s}"))
        if not self.route_prefix.startswith("/"):
            problems.append(("route_prefix", f"must start with '/', got {self.route_prefix!r}"))
        return problems

    def compute_threads(self) -> int:
        """Torch threads of one replica: ``num_threads``, else this node's cores split between the replicas."""
        if self.num_threads is not None:
            return self.num_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.autoscaling.max_replicas))


# --------------------------------------------------------------------------- parsing


def load_config(cls: type[C], source: str | Path | Mapping[str, Any] | C | None = None,
                overrides: Iterable[str] = ()) -> C:
    """Build a ``cls`` config from a YAML file, a dict or an instance, plus ``key.path=value`` overrides.

    Raises:
        ConfigError: listing every problem found, each with its key path.
    """
    where = None
    if source is None:
        data: Any = {}
    elif isinstance(source, cls):
        data = to_dict(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        where = str(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid YAML: {exc}".replace("\n", " "), source=where) from None
        data = serve_app_args(data, source=where) if cls is ServeConfig else data  # a `serve run` file
    problems: list[str] = []
    data = apply_overrides(data, overrides, problems)
    result = _parse(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, source=where)
    return typing.cast(C, result)


def apply_overrides(data: Any, overrides: Iterable[str], problems: list[str] | None = None) -> Any:
    """Return ``data`` with each ``a.b.c=value`` applied; values are parsed as YAML scalars/lists."""
    collected: list[str] = [] if problems is None else problems
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            collected.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = result
        if not isinstance(node, dict):
            collected.append(f"{key}: cannot override inside a non-mapping config")
            continue
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                collected.append(f"{key}: {part} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems is None and collected:
        raise ConfigError(collected)
    return result


def to_dict(config: Any) -> Any:
    """A plain-data (YAML/JSON-safe) copy of a config dataclass."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def to_yaml(config: Any) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal object."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config), encoding="utf-8")
    return path


def _parse(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.append(f"{_join(prefix, str(key))}: unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(prefix, name), problems)
    if len(problems) > before:
        return None
    instance = cls(**kwargs)
    check = getattr(instance, "check", None)
    if callable(check):
        for key, message in check():
            problems.append(f"{_join(prefix, key)}: {message}")
    return instance


def _coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], path, problems)
        for option in options:
            trial: list[str] = []
            result = _coerce(value, option, path, trial)
            if not trial:
                return result
        problems.append(f"{path}: expected {_type_name(hint)}, got {_describe(value)}")
        return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, path, problems)
    if origin in (list, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return None
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return None
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_hint, f"{path}.{k}", problems) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_describe(value)}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_describe(value)}")
        return value
    return value


def _at_least(problems: Problems, config: Any, name: str, minimum: float) -> None:
    value = getattr(config, name)
    if value is not None and value < minimum:
        problems.append((name, f"must be >= {minimum}, got {value}"))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_beside_serve(cls: type[C], own: Mapping[str, Any], served: Mapping[str, Any]) -> tuple[C | None,
                                                                                            ServeConfig | None,
                                                                                            list[str]]:
    """Parse an app's own section (``cls``, e.g. canary or regions fields) and the ServeConfig fields beside it.

    Returns both configs (None where that part failed) and every problem of either, so a caller can add its
    own cross-checks and report all of them at once.
    """
    problems: list[str] = []
    parsed: list[Any] = []
    for kind, data in ((cls, own), (ServeConfig, served)):
        try:
            parsed.append(load_config(kind, dict(data)))
        except ConfigError as exc:
            problems += exc.problems
            parsed.append(None)
    return parsed[0], parsed[1], problems


SERVE_APP_BUILDER = "llmstack.serve:build_app"  # import_path of a plain llmstack app in a `serve run` file


def serve_app_args(data: Any, *, source: str | None = None, import_path: str = SERVE_APP_BUILDER) -> Any:
    """The flat builder args of a ``serve run`` file's one application; other data comes back unchanged.

    A Serve config file (it has ``applications:``) becomes the application's ``args`` plus its ``name``
    (as ``app_name``), ``route_prefix`` and ``http_options.host`` / ``port``, so one file serves both
    ``serve run`` and ``llmstack deploy --config``. Anything the builder args cannot carry is refused.

    Args:
        data: the parsed YAML of a config file.
        source: the file name, for error messages.
        import_path: the builder the application must name (the canary builder for canary files).

    Raises:
        ConfigError: more than one application, another ``import_path``, or Serve options (per-deployment
            overrides, runtime_env, other http_options) that would be dropped; every problem at once.

    Example:
        >>> serve_app_args({"http_options": {"port": 8001}, "applications": [
        ...     {"name": "app", "import_path": "llmstack.serve:build_app", "args": {"model": "m@v1"}}]})
        {'model': 'm@v1', 'app_name': 'app', 'port': 8001}
    """
    if not isinstance(data, Mapping) or "applications" not in data:
        return data
    problems: list[str] = []
    for key in data:
        if key not in ("applications", "http_options", "proxy_location"):
            problems.append(f"{key}: not carried into the app's args (a serve file here takes applications, "
                            "http_options.host/port and proxy_location)")
    apps = data["applications"]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], Mapping):
        names = [a.get("name", "?") for a in apps if isinstance(a, Mapping)] if isinstance(apps, list) else []
        problems.append(f"applications: expected exactly one application, got "
                        f"{len(apps) if isinstance(apps, list) else _describe(apps)}"
                        + (f" ({', '.join(map(str, names))})" if names else ""))
        raise ConfigError(problems, source=source)
    app = apps[0]
    flat: dict[str, Any] = {}
    if app.get("import_path") != import_path:
        problems.append(f"applications[0].import_path: expected {import_path}, got {app.get('import_path')!r}")
    args = app.get("args") or {}
    if not isinstance(args, Mapping):
        problems.append(f"applications[0].args: expected a mapping, got {_describe(args)}")
    else:
        flat.update(args)
    for key, target in (("name", "app_name"), ("route_prefix", "route_prefix")):
        if key in app:
            flat[target] = app[key]
    for key in app:
        if key not in ("name", "route_prefix", "import_path", "args"):
            problems.append(f"applications[0].{key}: not carried into the app's args; set it in args instead")
    http = data.get("http_options") or {}
    if not isinstance(http, Mapping):
        problems.append(f"http_options: expected a mapping, got {_describe(http)}")
        http = {}
    for key in http:
        if key in ("host", "port"):
            flat[key] = http[key]
        else:
            problems.append(f"http_options.{key}: not carried into the app's args (host and port are)")
    if problems:
        raise ConfigError(problems, source=source)
    return flat


__all__ = [
    "AutoscalingConfig",
    "DataConfig",
    "InstructionDataConfig",
    "FinetuneConfig",
    "LoRAConfig",
    "ModelConfig",
    "QuantizeConfig",
    "ScalingConfig",
    "ServeConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_config",
    "save_config",
    "serve_app_args",
    "to_dict",
    "to_yaml",
]
