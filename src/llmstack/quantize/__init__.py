"""Post-training quantization: LLM.int8, NF4/FP4, SmoothQuant W8A8, naive W8A8 and dynamic int8.

One module per backend behind a small dispatcher (first match wins, heavy imports lazy):
``bnb`` (int8, nf4, fp4), ``smoothquant`` (smoothquant, w8a8), ``dynamic`` (dynamic-int8).

Example:
    >>> from llmstack.quantize import quantize, load_quantized
    >>> result = quantize("tiny-lm@v1", "smoothquant")  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> model, tokenizer = load_quantized(None, result.ref)  # doctest: +SKIP
"""

from llmstack.quantize._api import quantize
from llmstack.quantize._dispatch import known_methods
from llmstack.quantize._io import is_quantized_dir, load_any, load_quantized
from llmstack.quantize._result import QuantizeResult

__all__ = ["QuantizeResult", "is_quantized_dir", "known_methods", "load_any", "load_quantized", "quantize"]
