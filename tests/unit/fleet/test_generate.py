"""The day generator: seeded, diurnal, heavy-tailed and small-job-heavy."""

from __future__ import annotations

import statistics

from llmstack.fleet import generate_day, peak_demand_slots
from llmstack.fleet.generate import DAY_S


def test_same_seed_same_day_other_seed_other_day() -> None:
    assert generate_day(seed=7, jobs_per_day=100) == generate_day(seed=7, jobs_per_day=100)
    assert generate_day(seed=7, jobs_per_day=100) != generate_day(seed=8, jobs_per_day=100)


def test_working_hours_get_most_submissions() -> None:
    jobs = generate_day(seed=1, jobs_per_day=1000)
    hours = [job.arrival_s // 3600 for job in jobs]
    working = sum(9 <= hour < 17 for hour in hours)
    night = sum(hour < 8 for hour in hours)
    assert 800 < len(jobs) < 1200
    assert working > 4 * night
    assert all(0 <= job.arrival_s < DAY_S for job in jobs)


def test_durations_are_heavy_tailed_and_most_jobs_small() -> None:
    jobs = generate_day(seed=2, jobs_per_day=2000)
    runtimes = sorted(job.runtime_s(job.max_workers, 0.9) for job in jobs)
    median = statistics.median(runtimes)
    p95 = runtimes[int(0.95 * len(runtimes))]
    assert 900 < median < 1600  # the default median run time is 20 min
    assert p95 > 5 * median
    assert sum(job.max_workers <= 2 for job in jobs) > 0.5 * len(jobs)
    assert all(1 <= job.min_workers <= job.max_workers for job in jobs)


def test_peak_demand_counts_overlapping_jobs() -> None:
    jobs = generate_day(seed=3, jobs_per_day=20)
    first = jobs[0]
    alone = [first]
    assert peak_demand_slots(alone) == first.max_workers * first.worker_slots
    assert peak_demand_slots(jobs) <= sum(job.max_workers for job in jobs)
