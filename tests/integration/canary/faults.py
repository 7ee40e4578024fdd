"""TEST/FAULT INJECTION ONLY: the fault-injecting deployment, importable as ``faults`` by the canary tests.

It lives in ``llmstack.serve._faults`` so that benchmarks/canary_bench.py can use it without importing tests/.
"""

from llmstack.serve._faults import FAULTS, FaultInjectingLLMServer

__all__ = ["FAULTS", "FaultInjectingLLMServer"]
