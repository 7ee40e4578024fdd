"""A fleet of training jobs on one autoscaling cluster: a job-trace format, a generator and a simulator.

- :func:`read_jobs` / :func:`write_jobs`: a CSV or JSON Lines trace of :class:`Job` rows.
- :func:`generate_day`: a seedable day of arrivals shaped like published GPU-cluster studies.
- :func:`simulate`: replays jobs through a :class:`ClusterSetup` (Ray's autoscaler rules, fixed or elastic
  jobs) and returns a :class:`FleetResult` (node-seconds, utilisation, completion times, time series).

Pure Python: nothing here imports Ray.

May import: ``errors`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.fleet import ClusterSetup, NodeType, generate_day, simulate
    >>> jobs = generate_day(seed=0, jobs_per_day=40)
    >>> setup = ClusterSetup("elastic", (NodeType("gpu8", worker_slots=8, max_nodes=4),), elastic=True)
    >>> 0 < simulate(jobs, setup).utilisation <= 1
    True
"""

from __future__ import annotations

from llmstack.fleet.generate import generate_day, peak_demand_slots
from llmstack.fleet.simulate import ClusterSetup, FleetResult, JobOutcome, NodeType, check_fits, simulate
from llmstack.fleet.trace import Job, JobTraceError, read_jobs, speedup, write_jobs

__all__ = [
    "ClusterSetup",
    "FleetResult",
    "Job",
    "JobOutcome",
    "JobTraceError",
    "NodeType",
    "check_fits",
    "generate_day",
    "peak_demand_slots",
    "read_jobs",
    "simulate",
    "speedup",
    "write_jobs",
]
