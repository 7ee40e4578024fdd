"""A fleet of training jobs on one autoscaling cluster: a job-trace format, a generator and a simulator.

- :func:`read_jobs` / :func:`write_jobs`: a CSV or JSON Lines trace of :class:`Job` rows.
- :func:`generate_day`: a seedable day of arrivals shaped like published GPU-cluster studies.
- :func:`submit_job`, :func:`list_jobs`, :func:`job_status`, :func:`job_logs`, :func:`stop_job`: training and
  fine-tuning runs as Ray Jobs on a running cluster (``llmstack jobs ...``).
- :mod:`llmstack.fleet.local_cluster`: a local autoscaling Ray cluster (Ray's autoscaler over fake nodes) for
  tests and the live benchmark.
- :func:`simulate`: replays jobs through a :class:`ClusterSetup` (Ray's autoscaler rules, fixed or elastic
  jobs) and returns a :class:`FleetResult` (node-seconds, utilisation, completion times, time series).

Nothing here imports Ray until a job is submitted or followed.

May import: ``_ray``, ``config``, ``data``, ``errors``, ``train`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.fleet import ClusterSetup, NodeType, generate_day, simulate
    >>> jobs = generate_day(seed=0, jobs_per_day=40)
    >>> setup = ClusterSetup("elastic", (NodeType("gpu8", worker_slots=8, max_nodes=4),), elastic=True)
    >>> 0 < simulate(jobs, setup).utilisation <= 1
    True
"""

from __future__ import annotations

from llmstack.fleet.generate import generate_day, peak_demand_slots
from llmstack.fleet.jobs import JobRecord, job_logs, job_status, list_jobs, stop_job, submit_job, wait_for_job
from llmstack.fleet.simulate import ClusterSetup, FleetResult, JobOutcome, NodeType, check_fits, simulate
from llmstack.fleet.trace import Job, JobTraceError, read_jobs, speedup, write_jobs

__all__ = [
    "ClusterSetup",
    "FleetResult",
    "Job",
    "JobOutcome",
    "JobRecord",
    "JobTraceError",
    "NodeType",
    "check_fits",
    "generate_day",
    "job_logs",
    "job_status",
    "list_jobs",
    "peak_demand_slots",
    "read_jobs",
    "simulate",
    "speedup",
    "stop_job",
    "submit_job",
    "wait_for_job",
    "write_jobs",
]
