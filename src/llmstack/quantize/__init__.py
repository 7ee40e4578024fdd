"""Post-training quantization: torchao int8/int4, LLM.int8, NF4/FP4, SmoothQuant W8A8 and naive W8A8.

One module per backend behind a small dispatcher (first match wins, heavy imports lazy):
``torchao_backend`` (int8-weight-only, int8-dynamic, int4-weight-only; ``dynamic-int8``, the old
torch.ao method, is an alias of int8-dynamic), ``bnb`` (int8, nf4, fp4), ``smoothquant`` (smoothquant, w8a8).

Every result is a registry version of kind ``quantized`` whose parent is the float source. Its
directory holds safetensors only, plus ``quantization.json`` (the recipe) and the tokenizer:

* ``int8`` / ``nf4`` / ``fp4`` are stored in transformers' bitsandbytes serialization (int8 weights +
  row scales; packed 4-bit + absmax / nested absmax + quant state) and reload bit-exactly;
* ``smoothquant`` / ``w8a8`` store int8 weights + float32 per-channel scales (smoothing already
  folded into the weights and norms) and are rebuilt module by module on load;
* the torchao methods store each torchao tensor's plain inner tensors (int data, scales, zero
  points) and rebuild the tensors from them (no pickles, no re-quantization).

Non-quantized parameters (embeddings, norms, ``lm_head``) stay in the source's stored dtype.

``quantize()`` also measures held-out perplexity, bytes in memory and prefill/decode tokens/s of
the source and the result in the same run and records them, with ratios, in the manifest metrics.

May import: ``_verbs``, ``config``, ``data``, ``errors``, ``models`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.models import load_artifact
    >>> from llmstack.quantize import quantize
    >>> result = quantize(source="tiny-lm@v1", method="smoothquant")  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> loaded = load_artifact(result.ref)  # doctest: +SKIP

Loading goes through :func:`llmstack.models.load_artifact`; this package registers the loader that
rebuilds its versions there (:func:`~llmstack.quantize._io.load_recipe_model`) when it is imported.

May import: ``llmstack.config``, ``errors``, ``registry``, ``data`` and ``models``; nothing imports it
but the facade, the CLI and the quickstart (``llmstack.models`` finds it by name, see QUANTIZED_LOADER_PACKAGES).
"""

from llmstack.models.artifact import register_quantized_loader
from llmstack.quantize._api import quantize
from llmstack.quantize._dispatch import known_methods
from llmstack.quantize._io import is_quantized_dir, load_recipe_model, rebuild_quantized
from llmstack.quantize._result import QuantizeResult

register_quantized_loader("llmstack.quantize", load_recipe_model)

__all__ = ["QuantizeResult", "is_quantized_dir", "known_methods", "quantize", "rebuild_quantized"]
