"""PyTorch dynamic int8 backend (``dynamic-int8``): fbgemm / oneDNN quantized linear kernels.

Weights: int8 per output channel (symmetric). Activations: quantized per *tensor*, dynamically, at
every call, by the kernel itself. It needs no calibration and keeps the same decoder-linear scope
as the other methods (``lm_head`` stays float). One activation scale per call means a sequence's
output can shift slightly with what else is in its batch (W8A8's per-token scales do not), and it
is the most outlier-sensitive int8 method in the benchmark. Kept because the benchmark shows its prepacked
kernels are the fastest int8 path at decode on x86 CPUs (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack.quantize._base import load_int8_model, save_int8_model


class DynamicInt8Backend:
    methods = ("dynamic-int8",)
    needs_calibration: tuple[str, ...] = ()

    def hardware_problem(self, method: str, config: Any) -> str | None:
        import torch

        if getattr(config, "device", "cpu") != "cpu":
            return "dynamic-int8 uses PyTorch's CPU quantized kernels (fbgemm/oneDNN); it cannot run on GPU"
        engine = torch.backends.quantized.engine
        if engine not in ("x86", "fbgemm", "onednn", "qnnpack"):
            return f"no PyTorch quantized engine on this CPU (engine={engine!r})"
        try:
            from llmstack.quantize._int8 import DynamicInt8Linear

            probe = DynamicInt8Linear.from_linear(torch.nn.Linear(16, 8))
            probe(torch.randn(2, 16))
        except Exception as exc:
            return f"PyTorch dynamic int8 linear fails on this CPU ({type(exc).__name__}: {exc})"
        return None

    def architecture_problems(self, skeleton: Any, method: str) -> list[str]:
        from llmstack.quantize._int8 import decoder_linear_names

        if not decoder_linear_names(skeleton):
            return [f"{type(skeleton).__name__} has no nn.Linear layers in a decoder stack (model.layers)"]
        return []

    def quantize(self, model: Any, *, method: str, source_dir: Path, config: Any, calibration: Any,
                 progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        from llmstack.quantize._int8 import DynamicInt8Linear, _cpu_has_vnni, decoder_linear_names, replace_module

        names = decoder_linear_names(model)
        for name in names:
            replace_module(model, name, DynamicInt8Linear.from_linear(model.get_submodule(name)))
        return model, {"layers": names, "weights": "int8 per output channel, symmetric",
                       "activations": "int8 per tensor, dynamic (inside the kernel)",
                       "reduce_range": not _cpu_has_vnni(), "matmul": "torch.ops.quantized.linear_dynamic"}

    def save(self, model: Any, directory: Path) -> None:
        save_int8_model(model, directory, method="dynamic-int8")

    def load(self, directory: Path, recipe: dict[str, Any]) -> Any:
        from llmstack.quantize._int8 import DynamicInt8Linear, replace_module

        layers = recipe.get("details", {}).get("layers", [])

        def convert(model: Any) -> None:
            for name in layers:
                old = model.get_submodule(name)
                replace_module(model, name, DynamicInt8Linear(old.in_features, old.out_features,
                                                              bias=old.bias is not None))

        return load_int8_model(directory, dtype=recipe.get("dtype", "float32"), convert=convert)


BACKEND = DynamicInt8Backend()
