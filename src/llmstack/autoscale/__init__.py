"""Elastic orchestration: a predictive, SLO-aware autoscaling policy for Ray Serve, trace replay and a simulator.

- :func:`serve_autoscaling_config` builds the ``autoscaling_config`` of the model deployment;
  ``policy: predictive`` plugs :class:`PredictivePolicy` into Serve's custom-policy API.
- :func:`read_trace` reads a ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV into a :class:`Trace`.
- :func:`simulate` runs the same policies on a simulated clock; :func:`replay` sends a trace over HTTP.

Only light modules load here: Ray is imported when a simulation or a probe needs it, httpx by :func:`replay`.

May import: ``config``, ``errors`` (checked by tests/unit/test_import_graph.py).

Example:
    >>> from llmstack.autoscale import read_trace, simulate  # doctest: +SKIP
    >>> simulate(read_trace("trace.csv"), ReplicaAutoscalingConfig(max_replicas=8, policy="predictive"))  # doctest: +SKIP
"""

from __future__ import annotations

from llmstack.autoscale.forecast import HoltWinters
from llmstack.autoscale.policy import LoadCounters, PredictivePolicy, serve_autoscaling_config
from llmstack.autoscale.replay import ReplayError, ReplayResult, replay, serve_replica_probe
from llmstack.autoscale.simulator import ReplicaModel, SimulationResult, simulate
from llmstack.autoscale.trace import Trace, TraceError, read_trace, synthetic_trace

__all__ = [
    "HoltWinters",
    "LoadCounters",
    "PredictivePolicy",
    "ReplayError",
    "ReplayResult",
    "ReplicaModel",
    "SimulationResult",
    "Trace",
    "TraceError",
    "read_trace",
    "replay",
    "serve_autoscaling_config",
    "serve_replica_probe",
    "simulate",
    "synthetic_trace",
]
