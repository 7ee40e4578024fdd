"""The five fine-tuning methods, as functions that turn a loaded base model into a trainable one.

``lora``    low-rank adapters (peft) on linear layers; the base is frozen.
``qlora``   LoRA on a frozen NF4 base (bitsandbytes 4-bit, double quantization, fp32 compute).
``dora``    weight-decomposed LoRA (peft ``use_dora``): a learned magnitude per output row on top.
``bitfit``  BitFit: every bias term and every normalisation parameter trains, the rest is frozen.
            What that is depends on the architecture (:func:`bitfit_plan`): GPT-2 its biases and
            LayerNorms, Qwen2 its q/k/v biases and RMSNorm scales, bias-free LLaMA, Mistral, Phi-3
            and Gemma-3 their norm scales alone (the closest honest counterpart there).
``full``    every parameter trains (the baseline the others are measured against).

Everything heavy is imported inside the functions; :class:`ModelFactory` is a small picklable
object that Ray Train workers call to build the same model on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmstack.config import FINETUNE_METHODS, FinetuneMethodConfig
from llmstack.errors import ConfigError
from llmstack.models.nf4 import check_bitsandbytes

if TYPE_CHECKING:
    from llmstack.models.artifact import Artifact, LoadedArtifact

__all__ = ["ADAPTER_METHODS", "METHOD_DESCRIPTIONS", "PEFT_METHODS", "ModelFactory", "apply_method",
           "base_artifact", "check_bitsandbytes", "count_trainable", "linear_module_names", "norm_parameter_names",
           "peft_lora_config", "resolve_target_modules", "training_device", "training_dtype"]

PEFT_METHODS = ("lora", "qlora", "dora")  # saved as peft adapters
ADAPTER_METHODS = ("lora", "qlora", "dora", "bitfit")  # registered as kind "adapter"

METHOD_DESCRIPTIONS: dict[str, str] = {
    "lora": "LoRA: low-rank adapters on linear layers; the base model is frozen",
    "qlora": "QLoRA: LoRA on a frozen NF4 base (bitsandbytes 4-bit, double quantization)",
    "dora": "DoRA: weight-decomposed low-rank adaptation (peft use_dora)",
    "bitfit": ("BitFit: only the bias terms and normalisation parameters train (norm scales alone "
               "on bias-free architectures such as LLaMA); the rest is frozen"),
    "full": "full fine-tuning: every parameter trains (baseline)",
}

_NORM_CLASS_MARKERS = ("RMSNorm", "LayerNorm")


# --------------------------------------------------------------------------- module discovery


def _is_linear(module: Any) -> bool:
    """A layer peft's LoRA can wrap: ``nn.Linear``, its bitsandbytes forms, and GPT-2's ``Conv1D`` (a linear layer
    with its weight stored transposed)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (torch.nn.Linear, Conv1D)):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_module_names(model: Any, *, decoder_only: bool = True) -> list[str]:
    """Leaf names (``q_proj``, ``down_proj``, GPT-2's ``c_attn``…) of the linear layers, sorted.

    ``decoder_only``: only those inside decoder layers (the default LoRA targets: every linear layer
    of the decoder, not the output head).
    """
    from llmstack.train.parallel import decoder_layers

    if decoder_only:
        scopes = decoder_layers(model)
        modules = [m for layer in scopes for m in layer.modules()]
    else:
        modules = list(model.modules())
    names: set[str] = set()
    named = {id(m): n for n, m in model.named_modules()}
    for module in modules:
        if _is_linear(module) and id(module) in named:
            names.add(named[id(module)].rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: Any, requested: list[str] | None) -> list[str]:
    """The LoRA target leaf names: ``requested`` checked against the model, or every decoder linear.

    Raises:
        ConfigError: a requested name matches no linear module; the message lists those that exist.
    """
    available = linear_module_names(model, decoder_only=False)
    if requested is None:
        return linear_module_names(model, decoder_only=True)
    if not requested:
        raise ConfigError("lora.target_modules: empty list; give module names or null for every decoder "
                          f"linear layer (linear modules that exist: {', '.join(available)})")
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, unknown))} "
                          f"{'does' if len(unknown) == 1 else 'do'} not exist in the base model; "
                          f"linear modules that exist: {', '.join(available)}")
    return list(dict.fromkeys(requested))


def _is_norm(module: Any) -> bool:
    """A normalisation layer: torch's own, or any class named ``*Norm`` (``LlamaRMSNorm``, ``Gemma3RMSNorm``...)."""
    import torch

    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)):
        return True
    name = type(module).__name__
    return name.endswith("Norm") or any(marker in name for marker in _NORM_CLASS_MARKERS)


def norm_parameter_names(model: Any) -> list[str]:
    """Names of the normalisation layers' own parameters (RMSNorm scales; LayerNorm weights and biases)."""
    found = []
    for module_name, module in model.named_modules():
        if _is_norm(module):
            for param_name, _ in module.named_parameters(recurse=False):
                found.append(f"{module_name}.{param_name}" if module_name else param_name)
    return found


@dataclass
class BitFitPlan:
    """What BitFit trains on one architecture: its bias terms and its normalisation parameters.

    Attributes:
        model_class: the model's class name (``GPT2LMHeadModel``...).
        bias_names: every parameter named ``bias`` outside the normalisation layers.
        norm_names: the normalisation layers' parameters (see :func:`norm_parameter_names`).
        norm_classes: the normalisation module classes found.
        module_classes: every module class of the model (named when there is nothing to tune).
    """

    model_class: str
    bias_names: list[str]
    norm_names: list[str]
    norm_classes: list[str]
    module_classes: list[str]

    @property
    def names(self) -> list[str]:
        return self.norm_names + self.bias_names

    def describe(self) -> str:
        """One line: what trains, e.g. ``GPT2LMHeadModel: 8 bias vectors + 10 norm parameters (LayerNorm)``."""
        norms = f"{len(self.norm_names)} norm parameters ({', '.join(self.norm_classes)})" if self.norm_names else ""
        biases = f"{len(self.bias_names)} bias vectors" if self.bias_names else ""
        return f"{self.model_class}: {' + '.join(part for part in (biases, norms) if part) or 'nothing to tune'}"


def bitfit_plan(model: Any) -> BitFitPlan:
    """The BitFit choice for ``model``'s architecture: its biases plus its normalisation parameters."""
    norm_names = norm_parameter_names(model)
    in_norms = set(norm_names)
    bias_names = [name for name, _ in model.named_parameters()
                  if name.rsplit(".", 1)[-1] == "bias" and name not in in_norms]
    norm_classes = sorted({type(m).__name__ for m in model.modules() if _is_norm(m)})
    module_classes = sorted({type(m).__name__ for m in model.modules()})
    return BitFitPlan(model_class=type(model).__name__, bias_names=bias_names, norm_names=norm_names,
                      norm_classes=norm_classes, module_classes=module_classes)


__all__ += ["BitFitPlan", "bitfit_plan"]


# --------------------------------------------------------------------------- building models


def training_dtype(method: str, dtype: str = "auto") -> str:
    """The dtype the base loads in to fine-tune with ``method``: the frozen base of lora/dora stays as stored
    (``"auto"``; its adapter weights are float32, see peft's ``autocast_adapter_dtype``); the weights that
    train in ``full`` and ``bitfit`` are float32 master weights unless ``dtype`` names another."""
    if dtype == "auto" and method in ("full", "bitfit"):
        return "float32"
    return dtype


def training_device(method: str, *, use_gpu: bool) -> str:
    """Where the base loads: QLoRA's NF4 weights on the worker's GPU when it has one, else the CPU (the
    training loop moves other models itself)."""
    if use_gpu and method == "qlora":
        from llmstack.train.parallel import resolve_device

        return str(resolve_device(True))
    return "cpu"


def base_artifact(source: str, *, registry: Any = None, method: str = "lora") -> Artifact:
    """The base to fine-tune with ``method``, described: its NF4 form for ``qlora`` (quantized as it loads).

    Load it with :func:`llmstack.models.load_artifact` in :func:`training_dtype` (QLoRA: on the training
    device, see :func:`training_device`).

    Raises:
        ConfigError: ``source`` is not a model (an adapter, a quantized version, a tokenizer).
    """
    from llmstack.models.artifact import describe_artifact, nf4_base_of

    artifact = describe_artifact(source, registry=registry)
    if artifact.kind != "model":
        raise ConfigError(f"base: {artifact.label} is a {artifact.kind}, expected a model")
    return nf4_base_of(artifact, adapter="being trained") if method == "qlora" else artifact


def peft_lora_config(lora: FinetuneMethodConfig, target_modules: list[str], *, method: str,
                     fan_in_fan_out: bool = False) -> Any:
    """peft's ``LoraConfig``; ``fan_in_fan_out`` for targets that store weights transposed (GPT-2's ``Conv1D``)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(target_modules), use_dora=method == "dora", bias="none",
                      task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)


def _targets_conv1d(model: Any, targets: list[str]) -> bool:
    """Whether the ``targets`` leaf names select ``Conv1D`` layers (GPT-2), whose LoRA needs ``fan_in_fan_out``."""
    from transformers.pytorch_utils import Conv1D

    wanted = set(targets)
    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in wanted for name, m in model.named_modules())


def apply_method(model: Any, method: str, lora: FinetuneMethodConfig, *, target_modules: list[str] | None = None,
                 seed: int = 0) -> Any:
    """Make ``model`` trainable the ``method`` way (adapter weights seeded, so every rank agrees).

    Returns the model to train: a ``PeftModel`` for lora/qlora/dora, else ``model`` itself with
    ``requires_grad`` set (biases and norms for bitfit, see :func:`bitfit_plan`; everything for full).

    Raises:
        ConfigError: an unknown method, or bitfit on a model with neither biases nor norms (names its classes).
    """
    import torch

    if method not in FINETUNE_METHODS:
        raise ConfigError(f"lora.method: unknown method {method!r}; known: {', '.join(FINETUNE_METHODS)}")
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "bitfit":
        plan = bitfit_plan(model)
        names = set(plan.names)
        if not names:
            raise ConfigError(
                f"lora.method=bitfit: {plan.model_class} has no bias terms and no normalisation layer (a class "
                f"named *Norm or torch's LayerNorm/RMSNorm/GroupNorm) to tune; its module classes are "
                f"{', '.join(plan.module_classes)}; use lora.method=lora, dora or full")
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        return model
    from peft import get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_modules or resolve_target_modules(model, lora.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = peft_lora_config(lora, targets, method=method, fan_in_fan_out=_targets_conv1d(model, targets))
        peft_model = get_peft_model(model, config)
    return peft_model


@dataclass
class ModelFactory:
    """Builds the model to fine-tune on a worker: base from the registry, then the method applied.

    Picklable (Ray ships it to each worker inside the loop's ``LoopSpec``).
    """

    registry: Any  # llmstack.registry.Registry (picklable)
    base: str  # concrete base ref, "name@vN"
    method: str
    lora: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    target_modules: list[str] | None = None
    seed: int = 0
    use_gpu: bool = False

    dtype: str = "auto"  # base weights dtype (see training_dtype); auto: as stored

    def load(self) -> LoadedArtifact:
        """The base (model and tokenizer) as this method starts from: one read of the base's files."""
        from llmstack.models.artifact import load_artifact

        device = training_device(self.method, use_gpu=self.use_gpu) if self.method == "qlora" else "cpu"
        return load_artifact(base_artifact(self.base, registry=self.registry, method=self.method),
                             dtype=training_dtype(self.method, self.dtype), device=device)

    def apply(self, model: Any) -> Any:
        """``model`` (from :meth:`load`) made trainable the configured way."""
        return apply_method(model, self.method, self.lora, target_modules=self.target_modules, seed=self.seed)

    def __call__(self) -> Any:
        return self.apply(self.load().model)


def count_trainable(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit packed weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n = int(param.quant_state.shape.numel()) if getattr(param, "quant_state", None) is not None else n * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
