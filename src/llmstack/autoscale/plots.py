"""One figure for autoscaling runs: offered load, replicas over time, and TTFT against the SLO.

Example:
    >>> series = RunSeries("predictive", load=([0, 1], [3, 5]), replicas=([0, 1], [1, 2]), ttft=([0.5], [0.2]))
    >>> plot_runs([series], "runs.png", ttft_slo_s=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

Series = tuple[Sequence[float], Sequence[float]]


@dataclasses.dataclass
class RunSeries:
    """One run's curves: requests/s over time, replicas over time, (arrival, TTFT) points."""

    name: str
    load: Series
    replicas: Series
    ttft: Series


def plot_runs(runs: Sequence[RunSeries], path: str | Path, *, ttft_slo_s: float, title: str = "") -> Path:
    """Write a three-panel PNG (load, replicas, TTFT) comparing ``runs`` on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                                   gridspec_kw={"height_ratios": [1, 1.2, 1.2]})
    if runs:
        ax_load.fill_between(runs[0].load[0], runs[0].load[1], step="post", color="0.6", linewidth=0)
    ax_load.set_ylabel("requests/s")
    for run in runs:
        ax_rep.step(run.replicas[0], run.replicas[1], where="post", label=run.name, linewidth=1.2)
        ax_ttft.scatter(run.ttft[0], run.ttft[1], s=2, alpha=0.4, label=run.name)
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper right", fontsize=8)
    ax_ttft.axhline(ttft_slo_s, color="red", linestyle="--", linewidth=1, label=f"SLO {ttft_slo_s:g} s")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT (s)")
    ax_ttft.set_xlabel("time (s)")
    ax_ttft.legend(loc="upper right", fontsize=8, markerscale=4)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def simulation_series(result: object, name: str | None = None) -> RunSeries:
    """The curves of a :class:`~llmstack.autoscale.simulator.SimulationResult`."""
    timeline = result.timeline  # type: ignore[attr-defined]
    records = result.requests  # type: ignore[attr-defined]
    points = [(r["arrival_s"], r["ttft_s"]) for r in records if r["ttft_s"] is not None]
    return RunSeries(name or result.policy,  # type: ignore[attr-defined]
                     load=(timeline["time"], timeline["arrivals"]), replicas=(timeline["time"], timeline["target"]),
                     ttft=([p[0] for p in points], [p[1] for p in points]))


def replay_series(result: object, name: str) -> RunSeries:
    """The curves of a :class:`~llmstack.autoscale.replay.ReplayResult` (load binned per second)."""
    records = result.records  # type: ignore[attr-defined]
    seconds = int(max((r["arrival_s"] for r in records), default=0)) + 1
    load = [0.0] * seconds
    for r in records:
        load[int(r["arrival_s"])] += 1
    replicas = result.replicas  # type: ignore[attr-defined]
    points = [(r["arrival_s"], r["ttft_s"]) for r in records if r["ttft_s"] is not None]
    return RunSeries(name, load=(list(range(seconds)), load),
                     replicas=([t for t, _ in replicas], [n for _, n in replicas]),
                     ttft=([p[0] for p in points], [p[1] for p in points]))
