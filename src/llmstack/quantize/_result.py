"""What :func:`llmstack.quantize.quantize` returns, with a text comparison table for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class QuantizeResult:
    """A registered quantized version and how it compares with its float source.

    Attributes:
        ref: the new registry version (kind ``quantized``, parent = ``source``).
        source: the float source's reference (``name@vN``) or directory.
        method: the quantization method.
        metrics: flat metrics stored in the manifest: ``perplexity``, ``model_bytes``,
            ``quantized_layer_bytes``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``, each
            with ``source_<key>`` and ``<key>_ratio`` (quantized / source, same run); plus
            ``file_bytes``. Empty of evaluation keys when ``config.evaluation.enabled`` is false.
        recipe: the ``quantization.json`` written with the weights.
        config: the effective :class:`~llmstack.config.QuantizeConfig` as plain data.
    """

    ref: Any
    source: str
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """A fixed-width comparison of source and quantized model (what ``llmstack quantize`` prints)."""
        m = self.metrics
        rows = [("perplexity", "perplexity", "{:.3f}", "lower is better"),
                ("model bytes", "model_bytes", _mib, ""),
                ("quantized-layer bytes", "quantized_layer_bytes", _mib, "decoder linears"),
                ("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}", "higher is better"),
                ("decode tokens/s", "decode_tokens_per_s", "{:.1f}", "higher is better")]
        head = f"{self.method}: {self.source} -> {self.ref}"
        lines = [head, f"{'':<22} {'source':>12} {'quantized':>12} {'ratio':>8}"]
        for label, key, fmt, note in rows:
            if key not in m:
                continue
            fmt_fn = fmt if callable(fmt) else fmt.format
            src = m.get(f"source_{key}")
            ratio = m.get(f"{key}_ratio")
            lines.append(f"{label:<22} {fmt_fn(src) if src is not None else '-':>12} {fmt_fn(m[key]):>12} "
                         f"{(f'{ratio:.3f}' if ratio is not None else '-'):>8}  {note}".rstrip())
        if len(lines) == 2:
            lines.append("(evaluation skipped: evaluation.enabled=false)")
        details = self.recipe.get("details", {})
        if "alpha" in details:
            lines.append(f"smoothquant alpha = {details['alpha']:g}"
                         + (" (searched)" if "alpha_search" in details else ""))
        if "file_bytes" in m:
            lines.append(f"stored: {_mib(m['file_bytes'])} in safetensors")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"
