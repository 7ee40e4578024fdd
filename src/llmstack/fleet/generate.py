"""A seedable generator of a day of training and fine-tuning job arrivals.

The shapes follow published studies of shared deep-learning clusters; the parameters are ours (chosen
to give those shapes on a fine-tuning fleet), not fitted to the published traces:

- **Heavy-tailed run times, most jobs small.** Jeon et al., "Analysis of Large-Scale Multi-Tenant GPU
  Clusters for DNN Training Workloads", USENIX ATC 2019 (Microsoft Philly): run times span minutes to
  days with a long tail, and most jobs ask for one or a few GPUs while a few large jobs take much of the
  GPU time. Weng et al., "MLaaS in the Wild: Workload Analysis and Scheduling in Large-Scale Heterogeneous
  GPU Clusters", USENIX NSDI 2022 (Alibaba PAI): the same skew — most jobs are short and small, a small
  share of long jobs holds most of the GPU time. Here: a log-normal run time at the job's largest size
  (median ``median_runtime_s``, log-space sigma ``runtime_sigma``, clipped to [2 min, 12 h]) and worker
  counts drawn from ``max_worker_weights`` (half the jobs on one worker).
- **Submissions in working-hours bursts.** Both studies (and Hu et al., "Characterization and Prediction
  of Deep Learning Workloads in Large-Scale GPU Datacenters", SC 2021, SenseTime Helios) show a diurnal
  submission rate that peaks in working hours and falls at night. Here: a non-homogeneous Poisson process
  whose hourly rate follows :data:`HOURLY_PROFILE`.

Example:
    >>> jobs = generate_day(seed=1, jobs_per_day=50)
    >>> len(jobs) > 20 and all(a.arrival_s <= b.arrival_s for a, b in zip(jobs, jobs[1:]))
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from llmstack.fleet.trace import Job, speedup

DAY_S = 86_400.0

# Relative submission rate per hour of the day: night trough, a morning ramp, a lunch dip, an evening tail.
HOURLY_PROFILE: tuple[float, ...] = (
    0.10, 0.08, 0.06, 0.05, 0.05, 0.06, 0.10, 0.25,  # 00-07
    0.60, 1.00, 1.00, 0.95, 0.70, 0.85, 1.00, 1.00,  # 08-15
    0.90, 0.75, 0.50, 0.35, 0.30, 0.25, 0.20, 0.15,  # 16-23
)

# Seconds per optimizer step on one worker, full-parameter, by model size; other methods scale it.
STEP_S_BY_SIZE: Mapping[str, float] = {"135M": 0.5, "360M": 1.0, "1.7B": 3.0, "7B": 10.0}
METHOD_COST: Mapping[str, float] = {"train": 1.0, "full": 1.0, "lora": 0.6, "dora": 0.7, "qlora": 0.8, "bitfit": 0.5}
METHOD_WEIGHTS: Mapping[str, float] = {"lora": 0.40, "qlora": 0.20, "train": 0.15, "full": 0.10, "dora": 0.10,
                                       "bitfit": 0.05}
SIZE_WEIGHTS: Mapping[str, float] = {"135M": 0.35, "360M": 0.25, "1.7B": 0.25, "7B": 0.15}
SIZE_MIN_WORKERS: Mapping[str, int] = {"1.7B": 2, "7B": 4}  # larger models never run on fewer
MAX_WORKER_WEIGHTS: Mapping[int, float] = {1: 0.50, 2: 0.20, 4: 0.18, 8: 0.12}


def generate_day(*, seed: int = 0, jobs_per_day: float = 400.0, day_s: float = DAY_S,
                 median_runtime_s: float = 1_200.0, runtime_sigma: float = 1.3,
                 max_worker_weights: Mapping[int, float] = MAX_WORKER_WEIGHTS,
                 checkpoint_every_s: float = 300.0, scaling_efficiency: float = 0.9) -> list[Job]:
    """A day of jobs in arrival order; the same ``seed`` gives the same day.

    Args:
        seed: random seed.
        jobs_per_day: expected number of submissions over ``day_s``.
        day_s: the trace length (the hourly profile is stretched over it).
        median_runtime_s: median run time of a job on its ``max_workers``.
        runtime_sigma: log-space standard deviation of run times (1.3: the p95 is about 8x the median).
        max_worker_weights: probability of each largest worker count.
        checkpoint_every_s: wall time between checkpoints at the job's largest size.
        scaling_efficiency: used to turn a run time at ``max_workers`` into a step count.

    Example:
        >>> generate_day(seed=3, jobs_per_day=10)[0].method in METHOD_COST
        True
    """
    rng = random.Random(seed)
    peak = max(HOURLY_PROFILE)
    hour_s = day_s / len(HOURLY_PROFILE)
    mean_profile = sum(HOURLY_PROFILE) / len(HOURLY_PROFILE)
    peak_rate = jobs_per_day / day_s * peak / mean_profile  # submissions per second at the busiest hour
    jobs: list[Job] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak_rate)
        if t >= day_s:
            break
        if rng.random() > HOURLY_PROFILE[int(t // hour_s)] / peak:  # thinning: keep at the hour's rate
            continue
        jobs.append(_draw_job(rng, f"job-{len(jobs):04d}", t, median_runtime_s=median_runtime_s,
                              runtime_sigma=runtime_sigma, max_worker_weights=max_worker_weights,
                              checkpoint_every_s=checkpoint_every_s, scaling_efficiency=scaling_efficiency))
    return jobs


def _draw_job(rng: random.Random, job_id: str, arrival_s: float, *, median_runtime_s: float, runtime_sigma: float,
              max_worker_weights: Mapping[int, float], checkpoint_every_s: float,
              scaling_efficiency: float) -> Job:
    method = _choice(rng, METHOD_WEIGHTS)
    size = _choice(rng, SIZE_WEIGHTS)
    max_workers = max(_choice(rng, max_worker_weights), SIZE_MIN_WORKERS.get(size, 1))
    min_workers = max(1, max_workers // 4, SIZE_MIN_WORKERS.get(size, 1) // 2)
    step_s = STEP_S_BY_SIZE[size] * METHOD_COST[method]
    runtime_s = min(max(rng.lognormvariate(math.log(median_runtime_s), runtime_sigma), 120.0), 12 * 3600.0)
    step_at_max_s = step_s / speedup(max_workers, scaling_efficiency)
    steps = max(1, round(runtime_s / step_at_max_s))
    checkpoint_steps = max(1, min(steps, round(checkpoint_every_s / step_at_max_s)))
    return Job(job_id, round(arrival_s, 3), method, size, steps=steps, step_s=step_s, min_workers=min_workers,
               max_workers=max_workers, checkpoint_steps=checkpoint_steps)


def _choice(rng: random.Random, weights: Mapping[object, float]) -> object:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[key] for key in keys])[0]


def peak_demand_slots(jobs: list[Job], *, scaling_efficiency: float = 0.9) -> int:
    """Most accelerator slots in use at once if every job ran at ``max_workers`` from its arrival, unqueued.

    A static cluster "sized for the peak" holds this many slots.
    """
    events: list[tuple[float, int]] = []
    for job in jobs:
        slots = job.max_workers * job.worker_slots
        events.append((job.arrival_s, slots))
        events.append((job.arrival_s + job.runtime_s(job.max_workers, scaling_efficiency), -slots))
    in_use = peak = 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        in_use += change
        peak = max(peak, in_use)
    return peak
