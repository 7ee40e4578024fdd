"""Typed configuration for every stage, read from YAML or dicts, written back to YAML.

Each stage has a small dataclass whose fields carry a docstring-style comment. Parsing walks
the type hints, so unknown keys, wrong types and out-of-range values are *all* collected and
reported together, each with its key path (``training.micro_batch_size: must be >= 1, got 0``).

Example:
    >>> cfg = load_config(TrainConfig, {"training": {"max_steps": 10}}, ["scaling.num_workers=1"])
    >>> cfg.scaling.num_workers
    1

Each verb's config is nested by what its keys control (serve: ``http``, ``engine`` with ``engine.vllm``,
``autoscaling`` with ``autoscaling.predictive``, ``deployment`` for Ray Serve's own options; quantize: one
section per backend, ``calibration``, ``evaluation``). A key of the earlier flat shape is refused with its
new path, from the one table :data:`MOVED_KEYS`.

One module on purpose (~1000 lines): the parser walks every stage's dataclass, and users look for
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
# vLLM AsyncEngineArgs that engine.kind: vllm sets from ServeConfig keys (so engine.vllm.engine_kwargs may not)
VLLM_ARGS_SET_BY = {"model": "model", "tokenizer": "model", "dtype": "engine.vllm.dtype",
                    "max_model_len": "engine.vllm.max_model_len", "kv_cache_memory_bytes": "engine.vllm.kv_cache_gb",
                    "enforce_eager": "engine.vllm.enforce_eager", "max_num_seqs": "engine.max_batch_size",
                    "max_loras": "engine.max_adapters_per_replica", "max_cpu_loras": "engine.max_adapters_per_replica",
                    "enable_lora": "adapters", "enable_prefix_caching": "engine.prefix_cache_mb"}


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


# The instruction-data vocabulary these configs check; llmstack.data (which imports this module) uses it too.
#: Row fields ``data.columns`` may rename columns to (the formats llmstack.data.formats recognises).
INSTRUCTION_FIELDS = ("messages", "conversations", "prompt", "completion", "response", "system", "instruction",
                      "input", "output", "text")
#: Chat templates known by name (their text is in llmstack.data.chat_templates).
CHAT_TEMPLATE_NAMES = ("chatml", "llmstack")


def check_columns(columns: Mapping[str, Any]) -> list[str]:
    """Problems of a ``data.columns`` mapping (keys must be :data:`INSTRUCTION_FIELDS`, values column names)."""
    problems = []
    for canonical, column in columns.items():
        if canonical not in INSTRUCTION_FIELDS:
            problems.append(f"unknown field {canonical!r}; map one of {', '.join(INSTRUCTION_FIELDS)} to a column name")
        if not isinstance(column, str) or not column:
            problems.append(f"{canonical}: expected a column name, got {column!r}")
    return problems


@dataclass
class InstructionDataConfig(DataConfig):
    """Fine-tuning data: DataConfig plus how rows become chats and which tokens are learned."""

    # {canonical field: column} renames before the row format is recognized, e.g. {prompt: question, response: answer}
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None  # None: the tokenizer's own; chatml or llmstack, a Jinja file or Jinja text
    train_on_inputs: bool = False  # learn every token (prompts too), not only the assistant's answers

    def check(self) -> Problems:
        problems = super().check()
        problems += [("columns", problem) for problem in check_columns(self.columns)]
        if self.chat_template is not None:
            value = self.chat_template
            known = CHAT_TEMPLATE_NAMES
            if not (value in known or "{{" in value or "{%" in value or Path(value).expanduser().is_file()):
                problems.append(("chat_template", f"{value!r} is neither a known template "
                                                  f"({', '.join(known)}) nor an existing Jinja file"))
        return problems


@dataclass
class LoopConfig:
    """The ``training:`` section: the per-worker loop (steps, batches, optimizer, evaluation, checkpoints)."""

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
        for name in ("weight_decay", "grad_clip"):
            _at_least(problems, self, name, 0)
        return problems


@dataclass
class WorkersConfig:
    """The ``scaling:`` section: the Ray Train worker group a run uses (not Ray's ``ScalingConfig``)."""

    num_workers: int | list[int] = 2  # Ray Train workers, or [min, max]: elastic (starts on >= min, grows to max)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallel, or FSDP2 sharding per decoder layer
    use_gpu: bool = False  # one GPU per worker (nccl); CPU workers use gloo
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    max_failures: int = 0  # worker failures tolerated before the run fails
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a bounded local cluster
    price_per_worker_hour: float | None = None  # $ per worker-hour (its share of an instance); set: runs record cost_usd
    elastic_resize_interval_s: float = 60.0  # elastic runs: how often a healthy run checks whether it can grow

    def check(self) -> Problems:
        problems: Problems = []
        if isinstance(self.num_workers, list):
            if len(self.num_workers) != 2:
                problems.append(("num_workers", f"expected an integer or [min, max], got a list of "
                                                f"{len(self.num_workers)}: {self.num_workers}"))
            elif self.num_workers[0] < 1:
                problems.append(("num_workers", f"min must be >= 1, got {self.num_workers}"))
            elif self.num_workers[0] > self.num_workers[1]:
                problems.append(("num_workers", f"min must be <= max, got {self.num_workers}"))
        else:
            _at_least(problems, self, "num_workers", 1)
        _at_least(problems, self, "max_failures", -1)
        if not self.cpus_per_worker > 0:
            problems.append(("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}"))
        if not self.elastic_resize_interval_s >= 0:
            problems.append(("elastic_resize_interval_s", f"must be >= 0, got {self.elastic_resize_interval_s}"))
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
    training: LoopConfig = field(default_factory=LoopConfig)
    scaling: WorkersConfig = field(default_factory=WorkersConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig())  # MLflow (defined at the end)


@dataclass
class FinetuneMethodConfig:
    """The ``lora:`` section of a fine-tune: which parameters learn and, for adapters, their shape."""

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
    lora: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    training: LoopConfig = field(
        default_factory=lambda: LoopConfig(max_steps=100, learning_rate=1e-3, warmup_steps=10)
    )
    scaling: WorkersConfig = field(default_factory=WorkersConfig)
    packing: bool = False  # pack several instruction examples into each data.block_size row
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of storage_path
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig())  # MLflow (defined at the end)


@dataclass
class BitsAndBytesConfig:
    """``quantize.bitsandbytes``: the int8 (LLM.int8), nf4 and fp4 methods."""

    threshold: float = 6.0  # LLM.int8 outlier threshold
    block_size: int = 64  # nf4/fp4 quantization block size (a power of two in [32, 4096])
    double_quant: bool = True  # nf4/fp4: quantize the quantization constants too

    def check(self) -> Problems:
        problems: Problems = []
        if not self.threshold > 0:
            problems.append(("threshold", f"must be > 0, got {self.threshold}"))
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            problems.append(("block_size", f"must be a power of two in [32, 4096], got {self.block_size}"))
        return problems


@dataclass
class SmoothQuantConfig:
    """``quantize.smoothquant``: the smoothquant and w8a8 methods."""

    alpha: float = 0.5  # migration strength
    search_alpha: bool = False  # pick alpha on the calibration set
    alpha_grid: list[float] | None = None  # alphas tried by search_alpha (None: 0.3..0.8 step 0.1)
    smooth_outputs: bool = True  # also smooth v_proj->o_proj and up_proj->down_proj (exact for LLaMA)
    kernel: Literal["int8", "fake-quant"] = "int8"  # matmul: real torch._int_mm, or simulated in float

    def check(self) -> Problems:
        problems: Problems = []
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(("alpha", f"must be in [0, 1], got {self.alpha}"))
        if self.alpha_grid is not None and (not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid)):
            problems.append(("alpha_grid", f"must be a non-empty list of values in [0, 1], got {self.alpha_grid}"))
        return problems


@dataclass
class TorchaoConfig:
    """``quantize.torchao``: the int8-weight-only, int8-dynamic and int4-weight-only methods."""

    group_size: int = 64  # int4-weight-only: weights sharing one scale (32 | 64 | 128)
    int4_algorithm: Literal["hqq", "tinygemm"] = "hqq"  # int4-weight-only: how scales and zero points are chosen
    quantize_lm_head: bool = False  # quantize lm_head too (unties tied embeddings)
    keep_float: list[str] | None = None  # layer-name patterns left in float, e.g. ["*.mlp.gate_proj"]
    float_edge_layers: int = 1  # int8 methods: first and last N decoder layers stay float (measured sensitive)
    # int8-weight-only matmul: in the model's dtype (torchao's path), or bf16 activations on aten's int8 kernel (faster)
    weight_only_compute: Literal["model", "bfloat16"] = "model"

    def check(self) -> Problems:
        problems: Problems = []
        if self.group_size not in (32, 64, 128):
            problems.append(("group_size", f"must be 32, 64 or 128, got {self.group_size}"))
        _at_least(problems, self, "float_edge_layers", 0)
        return problems


@dataclass
class CalibrationConfig:
    """``quantize.calibration``: the data methods that calibrate (smoothquant, w8a8) see."""

    data: str | None = None  # calibration data source; None: the source's training corpus, else builtin:stdlib
    samples: int = 32  # blocks used for calibration

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "samples", 1)
        return problems


@dataclass
class QuantizeEvaluationConfig:
    """``quantize.evaluation``: perplexity, size and speed of the result against its source."""

    enabled: bool = True  # measure at all (false: quantize and register only)
    data: str | None = None  # held-out perplexity data; None: the source's training corpus, else builtin:stdlib
    samples: int = 16  # held-out blocks for perplexity
    speed_prompt_tokens: int = 64  # prompt length for the prefill tokens/s measurement
    speed_new_tokens: int = 32  # greedy tokens for the decode tokens/s measurement (KV cache, batch 1)
    speed_repeats: int = 3  # timing repeats (the median is kept)

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("samples", "speed_prompt_tokens", "speed_new_tokens", "speed_repeats"):
            _at_least(problems, self, name, 1)
        return problems


@dataclass
class QuantizeConfig:
    """What ``quantize`` does: the method, then one section per backend, calibration and evaluation."""

    # int8-weight-only | int8-dynamic | int4-weight-only (torchao) | int8 (LLM.int8) | nf4 | fp4 (bitsandbytes) |
    # smoothquant | w8a8; the default is the one measured most accurate at a speed gain on SmolLM2
    # (benchmarks/quantize_bench.py)
    method: str = "int8-weight-only"
    # source load dtype; non-quantized parts and compute use it (None: the dtype the source is stored in)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    seq_len: int = 128  # tokens per calibration / evaluation block
    torchao: TorchaoConfig = field(default_factory=TorchaoConfig)  # int8-weight-only, int8-dynamic, int4-weight-only
    bitsandbytes: BitsAndBytesConfig = field(default_factory=BitsAndBytesConfig)  # int8 (LLM.int8), nf4, fp4
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)  # smoothquant, w8a8
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # data the activation scales see
    evaluation: QuantizeEvaluationConfig = field(default_factory=QuantizeEvaluationConfig)  # the result vs its source

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "seq_len", 1)
        if self.method not in QUANTIZE_METHODS:
            problems.append(("method", f"unknown method {self.method!r}; known: {', '.join(QUANTIZE_METHODS)}"))
        return problems


@dataclass
class PredictiveScalingConfig:
    """``autoscaling.predictive``: llmstack's forecast policy (read only when ``policy: predictive``)."""

    ttft_slo_s: float = 1.0  # the time-to-first-token objective the capacity is measured at
    capacity_tokens_per_s: float = 10_000.0  # prompt+output tokens/s one replica sustains within the SLO
    capacity_requests_per_s: float | None = None  # requests/s one replica sustains (None: tokens only)
    headroom: float = 0.2  # spare capacity on top of the forecast (0.2 = 20%)
    forecast_bin_s: float = 2.0  # the rate series' step (counters are differenced this often)
    forecast_horizon_s: float = 10.0  # how far ahead to provision (cover a replica's start-up)
    season_s: float | None = None  # seasonal period; used once two periods of history exist
    upscale_cooldown_s: float = 0.0  # least time between two scale-ups
    downscale_stable_s: float = 20.0  # how long the lower demand must hold before scaling down
    downscale_cooldown_s: float = 30.0  # least time from any scale event to a scale-down
    hysteresis: float = 0.15  # a scale-down needs demand below (replicas - 1) * (1 - hysteresis)
    forecast_alpha: float = 0.5  # Holt-Winters level smoothing
    forecast_beta: float = 0.3  # Holt-Winters trend smoothing
    forecast_phi: float = 0.9  # trend damping (1: undamped; lower: a burst's first slope fades sooner)
    # queue term from all ongoing requests beyond target_ongoing_requests per replica, or only from those
    # queued at handles (the ones a new replica can take)
    backlog_source: Literal["ongoing", "queued"] = "ongoing"
    reserve_window_s: float = 0.0  # keep the reserve_quantile of the demand of this much history (0: off)
    reserve_quantile: float = 0.9  # that quantile (of per-bin demand, idle bins included)
    metrics_url: str | None = None  # the app's base URL; its /metrics gives arrival and token counters

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("headroom", "upscale_cooldown_s", "downscale_stable_s", "downscale_cooldown_s",
                     "reserve_window_s"):
            _at_least(problems, self, name, 0)
        for name in ("ttft_slo_s", "capacity_tokens_per_s", "forecast_bin_s", "forecast_horizon_s"):
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
        return problems


@dataclass
class ReplicaAutoscalingConfig:
    """``autoscaling``: how many model replicas run (not Ray's ``AutoscalingConfig``, which llmstack builds)."""

    min_replicas: int = 1  # replicas kept when idle
    max_replicas: int = 1  # upper bound under load
    target_ongoing_requests: float = 4.0  # per-replica queue depth the autoscaler aims for
    upscale_delay_s: float = 2.0  # sustained load before adding replicas (reactive)
    downscale_delay_s: float = 10.0  # sustained idleness before removing replicas (reactive)
    look_back_period_s: float = 10.0  # window the queue-depth metric is averaged over
    metrics_interval_s: float = 1.0  # how often handles and replicas report queue depth
    policy: Literal["reactive", "predictive"] = "reactive"  # Serve's queue-depth policy, or llmstack's forecast
    predictive: PredictiveScalingConfig = field(default_factory=PredictiveScalingConfig)

    def check(self) -> Problems:
        problems: Problems = []
        _at_least(problems, self, "min_replicas", 0)
        _at_least(problems, self, "max_replicas", 1)
        if self.max_replicas < self.min_replicas:
            problems.append(("max_replicas", f"must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}"))
        if not self.target_ongoing_requests > 0:
            problems.append(("target_ongoing_requests", f"must be > 0, got {self.target_ongoing_requests}"))
        for name in ("upscale_delay_s", "downscale_delay_s"):
            _at_least(problems, self, name, 0)
        for name in ("look_back_period_s", "metrics_interval_s"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.policy == "predictive":
            forecast = self.predictive
            if self.max_replicas <= self.min_replicas:
                problems.append(("max_replicas", f"policy predictive cannot scale between min_replicas "
                                 f"({self.min_replicas}) and max_replicas ({self.max_replicas}); "
                                 "make max_replicas larger or use policy: reactive"))
            if forecast.forecast_horizon_s < forecast.forecast_bin_s:
                problems.append(("predictive.forecast_horizon_s", f"must be >= predictive.forecast_bin_s "
                                 f"({forecast.forecast_bin_s}), got {forecast.forecast_horizon_s}"))
            if forecast.season_s is not None and forecast.season_s < 2 * forecast.forecast_bin_s:
                problems.append(("predictive.season_s", f"must span at least two forecast bins "
                                 f"({2 * forecast.forecast_bin_s} s), got {forecast.season_s}"))
        return problems


@dataclass
class HttpConfig:
    """``http``: how clients reach the app (address, auth, request limits)."""

    host: str = "127.0.0.1"  # HTTP host for deploy()
    port: int = 8000  # HTTP port for deploy()
    route_prefix: str = "/"  # HTTP route prefix
    api_key: str | None = None  # bearer key guarding every route but health; None: open
    max_body_bytes: int = 1_000_000  # larger bodies get 413
    request_timeout_s: float = 60.0  # generation is cancelled past this
    retry_after_s: float = 1.0  # Retry-After sent with a shed (503) request

    def check(self) -> Problems:
        problems: Problems = []
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be a TCP port, got {self.port}"))
        if not self.route_prefix.startswith("/"):
            problems.append(("route_prefix", f"must start with '/', got {self.route_prefix!r}"))
        _at_least(problems, self, "max_body_bytes", 1)
        _at_least(problems, self, "retry_after_s", 0)
        if not self.request_timeout_s > 0:
            problems.append(("request_timeout_s", f"must be > 0, got {self.request_timeout_s}"))
        return problems


@dataclass
class VllmConfig:
    """``engine.vllm``: settings read only when ``engine.kind: vllm``."""

    kv_cache_gb: float = 0.5  # memory for its paged KV cache per replica (RAM on CPU)
    # compute dtype; auto: the model's stored dtype (float16 runs as bfloat16 on a CPU)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None  # longest sequence (prompt + output); None: the model's positions, cut to
    # what kv_cache_gb holds
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (fast start-up; GPUs: false)
    # more vLLM AsyncEngineArgs, passed verbatim (e.g. block_size, swap_space); not those llmstack sets
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> Problems:
        problems: Problems = []
        if not self.kv_cache_gb > 0:
            problems.append(("kv_cache_gb", f"must be > 0, got {self.kv_cache_gb}"))
        _at_least(problems, self, "max_model_len", 1)
        for key in sorted(set(self.engine_kwargs) & set(VLLM_ARGS_SET_BY)):
            problems.append((f"engine_kwargs.{key}", f"llmstack sets it from {VLLM_ARGS_SET_BY[key]}; set that "
                             "instead"))
        return problems


def kv_bucket_problem(buckets: Sequence[Any]) -> str | None:
    """What is wrong with a KV bucket list on its own (``engine.kv_buckets``: increasing positive ints), or None."""
    if not buckets:
        return "must list at least one capacity (or leave it unset for powers of two)"
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets):
        return f"must be positive ints, got {list(buckets)}"
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        return f"must be strictly increasing, got {list(buckets)}"
    return None


@dataclass
class EngineConfig:
    """``engine``: what decodes in each model replica and how it batches, caches and bounds requests."""

    kind: Literal["transformers", "vllm"] = "transformers"  # the embedded engine, or vLLM (extra)
    max_batch_size: int = 8  # @serve.batch max batch size; also the cap on sequences per decode step
    batch_wait_timeout_s: float = 0.01  # @serve.batch wait for a batch to fill
    max_concurrent_batches: int = 32  # @serve.batch groups admitted at once; they join one decode loop
    response_cache_size: int = 256  # finished deterministic results kept per replica; 0 disables
    prefix_cache_mb: float = 64.0  # per replica: KV states of shared prompt prefixes (LRU); 0 disables
    default_max_tokens: int = 64  # when a request gives none
    max_tokens_limit: int = 512  # largest max_tokens accepted
    max_n: int = 4  # cap on choices per request
    max_adapters_per_replica: int = 4  # LRU bound on loaded adapters
    num_threads: int | None = None  # torch threads per replica; None: the node's cores shared by max_replicas
    prepack_weights: bool = True  # linear weights packed once for oneDNN (fp32/bf16, no adapters, compile off)
    # LLaMA-family models (llama, mistral without sliding window, qwen2) run a lean forward of fused projections
    # instead of transformers' modules (no adapters, compile off; other models keep transformers' forward)
    lean_forward: bool = True
    # weights and compute dtype of kind transformers (logits, sampling: float32); auto: the model's stored dtype
    # (float16 runs as bfloat16); one the CPU lacks the instructions for is refused at start-up
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False  # transformers engine: decode steps through torch.compile over kv_buckets
    kv_buckets: list[int] | None = None  # KV capacities of the compiled decode step; None: 128, 256, ... max len
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("max_batch_size", "max_tokens_limit", "max_n", "default_max_tokens",
                     "max_adapters_per_replica", "max_concurrent_batches"):
            _at_least(problems, self, name, 1)
        for name in ("response_cache_size", "prefix_cache_mb"):
            _at_least(problems, self, name, 0)
        if self.batch_wait_timeout_s < 0:
            problems.append(("batch_wait_timeout_s", f"must be >= 0, got {self.batch_wait_timeout_s}"))
        cores = os.cpu_count() or 1
        if self.num_threads is not None and not 1 <= self.num_threads <= cores:
            problems.append(("num_threads", f"must be in [1, {cores}] (this machine's cores), got {self.num_threads}"))
        if self.kv_buckets is not None:
            problem = kv_bucket_problem(self.kv_buckets)
            if problem is not None:
                problems.append(("kv_buckets", problem))
        return problems


# Ray Serve's own options of the model deployment (``serve.deployment(...)`` / ``.options(...)``), passed
# through from ``deployment:``; these are llmstack's defaults, a serve YAML's ``deployment:`` replaces any of
# them (ray_actor_options key by key).
SERVE_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 32,  # per replica; must allow batches to fill (>= engine.max_batch_size)
    "max_queued_requests": 64,  # beyond this the app sheds load with 503
    "ray_actor_options": {"num_cpus": 1.0},  # Ray's reservation per replica; num_gpus for engine vllm on GPUs
    "health_check_period_s": 2.0,  # a dead replica is noticed within seconds, not Serve's default 10 s
    "health_check_timeout_s": 10.0,
    "graceful_shutdown_timeout_s": 5.0,
}
# Serve deployment options a serve YAML may pass through (ray.serve.deployment's keyword arguments, Ray 2.60)
SERVE_DEPLOYMENT_OPTIONS = (
    "version", "ray_actor_options", "placement_group_bundles", "placement_group_strategy",
    "placement_group_bundle_label_selector", "max_replicas_per_node", "user_config", "max_ongoing_requests",
    "max_queued_requests", "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s", "health_check_period_s",
    "health_check_timeout_s", "logging_config", "request_router_config", "max_constructor_retry_count",
    "gang_scheduling_config", "deployment_actors", "rolling_update_percentage", "max_surge_percent")
# Serve deployment options llmstack sets itself, and from which key
SERVE_OPTIONS_SET_BY = {"name": "app_name (and the deployment's role)",
                        "num_replicas": "autoscaling.min_replicas/max_replicas",
                        "autoscaling_config": "autoscaling", "backpressure_config": "http.retry_after_s"}


def _merged_deployment(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over SERVE_DEPLOYMENT_DEFAULTS, ray_actor_options merged key by key."""
    merged: dict[str, Any] = {**SERVE_DEPLOYMENT_DEFAULTS, **options}
    actor = options.get("ray_actor_options")
    if isinstance(actor, Mapping):
        merged["ray_actor_options"] = {**SERVE_DEPLOYMENT_DEFAULTS["ray_actor_options"], **actor}
    return merged


@dataclass
class ServeConfig:
    """What ``deploy`` / ``serve run`` serves: the model (top level), then ``http``, ``engine``,
    ``autoscaling`` and ``deployment`` (Ray Serve's own options for the model deployment, passed through).

    Example:
        >>> cfg = load_config(ServeConfig, {"http": {"port": 8001}, "deployment": {"max_ongoing_requests": 16}})
        >>> cfg.http.port, cfg.deployment["max_ongoing_requests"], cfg.replica_resources()
        (8001, 16, {'CPU': 1.0, 'GPU': 0.0})
    """

    model: str = "tiny-lm@production"  # registry ref (or local dir) of the served model
    registry: str | None = None  # registry URL
    model_aliases: list[str] = field(default_factory=list)  # other names accepted for the model (name@production)
    app_name: str = "llmstack"  # Ray Serve application name
    adapters: list[str] = field(default_factory=list)  # adapter refs served on the same base
    http: HttpConfig = field(default_factory=HttpConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    autoscaling: ReplicaAutoscalingConfig = field(default_factory=ReplicaAutoscalingConfig)
    # Ray Serve options of the model deployment, passed to .options(...) verbatim over SERVE_DEPLOYMENT_DEFAULTS,
    # e.g. {max_ongoing_requests: 32, ray_actor_options: {num_cpus: 0.5}, health_check_period_s: 2}
    deployment: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.deployment, Mapping):
            self.deployment = _merged_deployment(self.deployment)

    def check(self) -> Problems:
        problems: Problems = []
        options = self.deployment if isinstance(self.deployment, Mapping) else {}
        for key in options:
            if key in SERVE_OPTIONS_SET_BY:
                problems.append((f"deployment.{key}", f"llmstack sets it from {SERVE_OPTIONS_SET_BY[key]}; "
                                 "set that instead"))
            elif key not in SERVE_DEPLOYMENT_OPTIONS:
                problems.append((f"deployment.{key}", "not a Ray Serve deployment option (known: "
                                 f"{', '.join(SERVE_DEPLOYMENT_OPTIONS)})"))
        ongoing, queued = options.get("max_ongoing_requests"), options.get("max_queued_requests")
        if isinstance(ongoing, bool) or not isinstance(ongoing, int) or ongoing < 1:
            problems.append(("deployment.max_ongoing_requests", f"must be an integer >= 1, got {ongoing!r}"))
        elif ongoing < self.engine.max_batch_size:
            problems.append(("deployment.max_ongoing_requests",
                             f"must be >= engine.max_batch_size ({self.engine.max_batch_size}) so batches can fill, "
                             f"got {ongoing}"))
        if isinstance(queued, bool) or not isinstance(queued, int) or queued < -1:
            problems.append(("deployment.max_queued_requests", f"must be an integer >= -1, got {queued!r}"))
        actor = options.get("ray_actor_options")
        if not isinstance(actor, Mapping):
            problems.append(("deployment.ray_actor_options", f"expected a mapping, got {_describe(actor)}"))
        else:
            for key in ("num_cpus", "num_gpus"):
                value = actor.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    problems.append((f"deployment.ray_actor_options.{key}", f"must be a number >= 0, got {value!r}"))
        return problems

    def replica_resources(self) -> dict[str, float]:
        """The Ray resources one model replica reserves: ``deployment.ray_actor_options`` num_cpus / num_gpus."""
        actor = self.deployment["ray_actor_options"]
        return {"CPU": float(actor.get("num_cpus", 1.0)), "GPU": float(actor.get("num_gpus", 0.0))}

    def compute_threads(self) -> int:
        """Torch threads of one replica: ``engine.num_threads``, else this node's cores split between the replicas."""
        if self.engine.num_threads is not None:
            return self.engine.num_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.autoscaling.max_replicas))


# --------------------------------------------------------------------------- keys that moved

_PREDICTIVE_KEYS = ("ttft_slo_s", "capacity_tokens_per_s", "capacity_requests_per_s", "headroom", "forecast_bin_s",
                    "forecast_horizon_s", "season_s", "upscale_cooldown_s", "downscale_stable_s",
                    "downscale_cooldown_s", "hysteresis", "forecast_alpha", "forecast_beta", "forecast_phi",
                    "backlog_source", "reserve_window_s", "reserve_quantile", "metrics_url")

# Old flat keys -> their key path in the nested shape, per config class (paths relative to that class's section).
# A config using an old key is refused with "old: moved to new"; a key that is now a section (``engine``,
# ``calibration``) counts as old when given a plain value. Attribute reads moved the same way (cfg.port ->
# cfg.http.port), except the deployment ones: cfg.num_cpus -> cfg.deployment["ray_actor_options"]["num_cpus"].
MOVED_KEYS: dict[type, dict[str, str]] = {
    ServeConfig: {
        "host": "http.host", "port": "http.port", "route_prefix": "http.route_prefix", "api_key": "http.api_key",
        "max_body_bytes": "http.max_body_bytes", "request_timeout_s": "http.request_timeout_s",
        "retry_after_s": "http.retry_after_s",
        "engine": "engine.kind",
        **{name: f"engine.{name}" for name in (
            "max_batch_size", "batch_wait_timeout_s", "max_concurrent_batches", "response_cache_size",
            "prefix_cache_mb", "default_max_tokens", "max_tokens_limit", "max_n", "max_adapters_per_replica",
            "num_threads")},
        **{f"vllm_{name}": f"engine.vllm.{name}" for name in (
            "kv_cache_gb", "dtype", "max_model_len", "enforce_eager", "engine_kwargs")},
        "max_ongoing_requests": "deployment.max_ongoing_requests",
        "max_queued_requests": "deployment.max_queued_requests",
        "num_cpus": "deployment.ray_actor_options.num_cpus",
        "num_gpus": "deployment.ray_actor_options.num_gpus",
    },
    ReplicaAutoscalingConfig: {name: f"predictive.{name}" for name in _PREDICTIVE_KEYS},
    QuantizeConfig: {
        "threshold": "bitsandbytes.threshold", "double_quant": "bitsandbytes.double_quant",
        "block_size": "bitsandbytes.block_size (nf4/fp4) or torchao.group_size (int4-weight-only)",
        **{name: f"smoothquant.{name}" for name in ("alpha", "search_alpha", "alpha_grid", "smooth_outputs",
                                                     "kernel")},
        **{name: f"torchao.{name}" for name in ("quantize_lm_head", "keep_float", "float_edge_layers",
                                                 "int4_algorithm", "weight_only_compute")},
        "calibration": "calibration.data", "calibration_samples": "calibration.samples",
        "evaluate": "evaluation.enabled", "eval_data": "evaluation.data", "eval_samples": "evaluation.samples",
        **{name: f"evaluation.{name}" for name in ("speed_prompt_tokens", "speed_new_tokens", "speed_repeats")},
    },
}


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


def merge_sections(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested mappings merged key by key (``{"http": {"port": 1}}`` keeps
    the other ``http`` keys), so Python callers can override one key of a section.

    Example:
        >>> merge_sections({"http": {"host": "h", "port": 1}}, {"http": {"port": 2}})
        {'http': {'host': 'h', 'port': 2}}
    """
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


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
    moved = MOVED_KEYS.get(cls, {})
    for key in data:
        if key in moved and key not in fields:
            problems.append(_moved(prefix, str(key), moved[key]))
        elif key not in fields:
            problems.append(f"{_join(prefix, str(key))}: unknown key (known: {', '.join(fields)})")
    # a key that is a section now, given a plain value the old way (`engine: vllm`, now engine.kind)
    old_values = {name for name in fields if name in moved and dataclasses.is_dataclass(hints[name])
                  and name in data and not isinstance(data[name], Mapping)}
    problems += [_moved(prefix, name, moved[name]) for name in old_values]
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name in fields:
        if name in data and name not in old_values:
            kwargs[name] = _coerce(_over_own_default(fields[name], hints[name], data[name]), hints[name],
                                   _join(prefix, name), problems)
    if any(not isinstance(problem, _RangeProblem) for problem in problems[before:]):
        return None  # a wrong type or shape below: range checks could not run on it
    instance = cls(**kwargs)
    check = getattr(instance, "check", None)
    if callable(check):
        for key, message in check():
            problems.append(_RangeProblem(f"{_join(prefix, key)}: {message}"))
    return instance


def _over_own_default(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """A section given as a mapping, filled in from its parent's own default for it rather than the section
    class's: ``{"data": {"block_size": 64}}`` keeps fine-tuning's ``builtin:stdlib-qa`` source."""
    if not (isinstance(value, Mapping) and dataclasses.is_dataclass(hint)
            and f.default_factory is not dataclasses.MISSING):
        return value
    return merge_sections(to_dict(f.default_factory()), value)


class _RangeProblem(str):
    """A problem a section's ``check()`` found: its parent section is still built and checked too."""


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
        problems.append(f"{path}: expected {' or '.join(map(_expected, options))}, got {_describe(value)}")
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


def _moved(prefix: str, key: str, new_path: str) -> str:
    return f"{_join(prefix, key)}: moved to {_join(prefix, new_path)}; set it there instead"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _expected(hint: Any) -> str:
    """A hint in words, as the other type errors say it (``int`` -> "an integer", ``list[int]`` -> "a list")."""
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in words:
        return words[hint]
    return "a list" if typing.get_origin(hint) in (list, Sequence, tuple) else _type_name(hint)


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
    (as ``app_name``), ``route_prefix`` and ``http_options.host`` / ``port`` (into ``http``), so one file serves both
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
        {'model': 'm@v1', 'app_name': 'app', 'http': {'port': 8001}}
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
    http_args = dict(flat["http"]) if isinstance(flat.get("http"), Mapping) else {}
    if "name" in app:
        flat["app_name"] = app["name"]
    if "route_prefix" in app:
        http_args["route_prefix"] = app["route_prefix"]
    for key in app:
        if key not in ("name", "route_prefix", "import_path", "args"):
            problems.append(f"applications[0].{key}: not carried into the app's args; set it in args instead")
    http = data.get("http_options") or {}
    if not isinstance(http, Mapping):
        problems.append(f"http_options: expected a mapping, got {_describe(http)}")
        http = {}
    for key in http:
        if key in ("host", "port"):
            http_args[key] = http[key]
        else:
            problems.append(f"http_options.{key}: not carried into the app's args (host and port are)")
    if problems:
        raise ConfigError(problems, source=source)
    if http_args:
        flat["http"] = http_args
    return flat


@dataclass
class TrackingConfig:
    """Experiment tracking of train/finetune runs (``tracking:`` in their configs)."""

    mlflow_uri: str | None = None  # MLflow tracking URI: a path (file store) or a server URL; None: off
    experiment: str = "llmstack"  # MLflow experiment the runs are logged under

    def check(self) -> Problems:
        return [] if self.experiment.strip() else [("experiment", "must not be empty")]


__all__ = [
    "BitsAndBytesConfig",
    "CalibrationConfig",
    "DataConfig",
    "EngineConfig",
    "FinetuneConfig",
    "FinetuneMethodConfig",
    "HttpConfig",
    "InstructionDataConfig",
    "LoopConfig",
    "MOVED_KEYS",
    "ModelConfig",
    "PredictiveScalingConfig",
    "QuantizeConfig",
    "QuantizeEvaluationConfig",
    "ReplicaAutoscalingConfig",
    "ServeConfig",
    "SmoothQuantConfig",
    "TorchaoConfig",
    "TrackingConfig",
    "TrainConfig",
    "VllmConfig",
    "WorkersConfig",
    "apply_overrides",
    "load_config",
    "merge_sections",
    "save_config",
    "serve_app_args",
    "to_dict",
    "to_yaml",
]
