"""The shared benchmark harness: everything two benchmarks would otherwise each write for themselves.

Rooms (each importable on its own; the benchmarks import ``harness`` because ``python benchmarks/X_bench.py``
puts this folder's parent on ``sys.path``):

- ``log``      timestamped progress lines (``logger("serve-bench")``)
- ``env``      quiet offline defaults for every bench, machine description (CPU name, load average), free ports
- ``timing``   percentiles, the steady-state median of step times
- ``report``   RESULTS.md sections, markdown tables (side-by-side columns), results JSON
- ``plots``    matplotlib set up for PNG output without a display
- ``loadgen``  the HTTP load generators (``llmstack.serve.loadgen``, shared with the integration tests,
               plus the count-bounded asyncio client)
- ``peers``    peer servers: vLLM's OpenAI server in its own venv, an llmstack app on a local cluster
- ``cluster``  the local Ray cluster (and Serve) a benchmark runs on, and the multi-node region cluster

May import: the standard library, llmstack (its public API, ``llmstack.serve.loadgen`` and the test-support
modules ``llmstack.serve._testing`` / ``_region_cluster`` / ``_faults``), Ray, matplotlib (lazily).
Never tests/ and never a benchmark script.
"""

from __future__ import annotations

from harness.env import apply_quiet_defaults, cpu_name, free_port, load_average
from harness.log import logger
from harness.report import RESULTS_DIR, RESULTS_MD, markdown_table, write_json, write_section
from harness.timing import pct

apply_quiet_defaults()

__all__ = ["RESULTS_DIR", "RESULTS_MD", "apply_quiet_defaults", "cpu_name", "free_port", "load_average", "logger",
           "markdown_table", "pct", "write_json", "write_section"]
