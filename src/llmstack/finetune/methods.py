"""The five fine-tuning methods, as functions that turn a loaded base model into a trainable one.

``lora``    low-rank adapters (peft) on linear layers; the base is frozen.
``qlora``   LoRA on a frozen NF4 base (bitsandbytes 4-bit, double quantization, fp32 compute).
``dora``    weight-decomposed LoRA (peft ``use_dora``): a learned magnitude per output row on top.
``bitfit``  *norm-scale tuning*, the BitFit analogue for bias-free LLaMA: LLaMA has no bias terms,
            so the closest honest counterpart trains only the RMSNorm scale vectors.
``full``    every parameter trains (the baseline the others are measured against).

Everything heavy is imported inside the functions; :class:`ModelFactory` is a small picklable
object that Ray Train workers call to build the same model on every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from llmstack.config import FINETUNE_METHODS, LoRAConfig
from llmstack.errors import ConfigError, ResourceError

PEFT_METHODS = ("lora", "qlora", "dora")  # saved as peft adapters
ADAPTER_METHODS = ("lora", "qlora", "dora", "bitfit")  # registered as kind "adapter"

METHOD_DESCRIPTIONS: dict[str, str] = {
    "lora": "LoRA: low-rank adapters on linear layers; the base model is frozen",
    "qlora": "QLoRA: LoRA on a frozen NF4 base (bitsandbytes 4-bit, double quantization)",
    "dora": "DoRA: weight-decomposed low-rank adaptation (peft use_dora)",
    "bitfit": ("norm-scale tuning, the BitFit analogue for bias-free LLaMA: LLaMA has no bias terms, "
               "so only the RMSNorm scale vectors train"),
    "full": "full fine-tuning: every parameter trains (baseline)",
}

# NF4 settings of the QLoRA base (the QLoRA paper's: 4-bit NormalFloat, double-quantized constants).
NF4_SETTINGS: dict[str, Any] = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}

_NORM_CLASS_MARKERS = ("RMSNorm", "LayerNorm")


# --------------------------------------------------------------------------- module discovery


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_module_names(model: Any, *, decoder_only: bool = True) -> list[str]:
    """Leaf names (``q_proj``, ``down_proj``…) of the linear layers, sorted.

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


def norm_parameter_names(model: Any) -> list[str]:
    """Names of the normalisation scale parameters (RMSNorm/LayerNorm weights)."""
    found = []
    for module_name, module in model.named_modules():
        if any(marker in type(module).__name__ for marker in _NORM_CLASS_MARKERS):
            for param_name, _ in module.named_parameters(recurse=False):
                found.append(f"{module_name}.{param_name}" if module_name else param_name)
    return found


# --------------------------------------------------------------------------- bitsandbytes


def check_bitsandbytes(device: str = "cpu") -> None:
    """Fail fast, saying why, when bitsandbytes cannot run NF4 on ``device``.

    Imports bitsandbytes and round-trips a small tensor through 4-bit NF4 quantization there.

    Raises:
        ResourceError: bitsandbytes is missing, or its 4-bit kernels do not run on ``device``.
    """
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as exc:  # ImportError, or a broken native library
        raise ResourceError(
            f"method qlora needs bitsandbytes for the NF4 base, but it cannot be imported "
            f"({type(exc).__name__}: {exc}); install bitsandbytes>=0.45 or use lora.method=lora") from None
    try:
        probe = torch.linspace(-1, 1, 128, dtype=torch.float32, device=device).reshape(2, 64)
        packed, state = bnbf.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state)
        if not torch.isfinite(restored).all() or (restored - probe).abs().max() > 0.2:
            raise RuntimeError("NF4 round trip gave wrong values")
    except Exception as exc:
        raise ResourceError(
            f"method qlora: bitsandbytes cannot run 4-bit NF4 quantization on {device} "
            f"({type(exc).__name__}: {exc}); use lora.method=lora, or a device bitsandbytes supports") from None


def nf4_quantization_config() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def dequantize_4bit_linears(model: Any) -> int:
    """Replace every bitsandbytes ``Linear4bit`` by an fp32 ``nn.Linear`` holding its dequantized weight.

    The result computes exactly what the NF4 model computes in training (dequantize, then an fp32
    matmul), so a QLoRA adapter merged into it keeps the behaviour it was trained with. (On CPUs
    with AVX512-bf16, bitsandbytes' *inference* path repacks the weights for a bf16 kernel; that
    repacking is undone first.) Returns the count replaced.
    """
    import bitsandbytes.functional as bnbf
    import torch

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Linear4bit":
                continue
            data, state = child.weight.data, child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # bnb's CPU inference repacking: undo it
                data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
            weight = bnbf.dequantize_4bit(data, state).float()
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=torch.float32)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if child.bias is not None:
                    linear.bias.copy_(child.bias.float())
            setattr(parent, child_name, linear)
            replaced += 1
    if hasattr(model, "config"):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                with contextlib.suppress(AttributeError):
                    delattr(model.config, attr)
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return replaced


# --------------------------------------------------------------------------- building models


def load_base(source: str, *, registry: Any = None, method: str = "lora", device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the base, in NF4 for ``qlora`` and fp32 otherwise."""
    if method != "qlora":
        from llmstack.models import load_model

        return load_model(source, registry=registry, dtype="float32")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmstack.errors import ModelLoadError
    from llmstack.models import resolve_model_source

    check_bitsandbytes(device)
    directory = resolve_model_source(str(source), registry=registry).directory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), quantization_config=nf4_quantization_config(), dtype=torch.float32,
            device_map={"": device}, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"cannot load {source} as an NF4 base: {exc}") from None
    keep_nf4_layout(model)
    release_file_mapping(model)
    model.eval()
    return model, tokenizer


def release_file_mapping(model: Any) -> None:
    """Copy the tensors that still view the loaded safetensors mmap into the process's own memory.

    The unquantized tensors (embeddings, norms, head) are slices of one mapping of the whole file, so
    they keep every page read while quantizing -- the fp32 weights the NF4 base replaced -- resident
    in this process. Once they own their memory the mapping and those pages are let go.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if type(param).__name__ != "Params4bit":
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def keep_nf4_layout(model: Any) -> None:
    """Keep bitsandbytes on its dequantize-then-fp32-matmul path in every mode.

    On CPUs with AVX512-bf16, ``Linear4bit`` repacks its weights on the first eval-mode forward for
    a bf16 inference kernel (``gemv_4bit``) that has no autograd: training steps after a periodic
    evaluation would then backpropagate through it incorrectly, and eval losses would be computed
    in bf16 rather than the fp32 math the adapter is trained (and merged) with.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def peft_lora_config(lora: LoRAConfig, target_modules: list[str], *, method: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(target_modules), use_dora=method == "dora", bias="none",
                      task_type="CAUSAL_LM")


def apply_method(model: Any, method: str, lora: LoRAConfig, *, target_modules: list[str] | None = None,
                 seed: int = 0) -> Any:
    """Make ``model`` trainable the ``method`` way (adapter weights seeded, so every rank agrees).

    Returns the model to train: a ``PeftModel`` for lora/qlora/dora, else ``model`` itself with
    ``requires_grad`` set (norm scales only for bitfit, everything for full).
    """
    import torch

    if method not in FINETUNE_METHODS:
        raise ConfigError(f"lora.method: unknown method {method!r}; known: {', '.join(FINETUNE_METHODS)}")
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "bitfit":
        names = set(norm_parameter_names(model))
        if not names:
            raise ConfigError("lora.method=bitfit: the base model has no normalisation layers to tune")
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
        peft_model = get_peft_model(model, peft_lora_config(lora, targets, method=method))
    return peft_model


@dataclass
class ModelFactory:
    """Builds the model to fine-tune on a worker: base from the registry, then the method applied.

    Picklable (Ray ships it to each worker inside the loop's ``LoopSpec``).
    """

    registry: Any  # llmstack.registry.Registry (picklable)
    base: str  # concrete base ref, "name@vN"
    method: str
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    target_modules: list[str] | None = None
    seed: int = 0
    use_gpu: bool = False

    def __call__(self) -> Any:
        device = "cpu"
        if self.use_gpu and self.method == "qlora":
            from llmstack.train.parallel import resolve_device

            device = str(resolve_device(True))
        model, _ = load_base(self.base, registry=self.registry, method=self.method, device=device)
        return apply_method(model, self.method, self.lora, target_modules=self.target_modules, seed=self.seed)


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
