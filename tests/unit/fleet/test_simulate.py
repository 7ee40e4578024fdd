"""The fleet simulator on hand-made traces whose outcomes are worked out by hand in each test."""

from __future__ import annotations

import pytest

from llmstack.errors import ResourceError
from llmstack.fleet import ClusterSetup, Job, NodeType, simulate


def _job(job_id: str, arrival_s: float = 0.0, *, steps: int = 100, step_s: float = 1.0, min_workers: int = 1,
         max_workers: int = 1, checkpoint_steps: int = 100, worker_slots: int = 1) -> Job:
    return Job(job_id, arrival_s, "lora", "135M", steps=steps, step_s=step_s, min_workers=min_workers,
               max_workers=max_workers, checkpoint_steps=checkpoint_steps, worker_slots=worker_slots)


def _setup(*, slots: int = 1, max_nodes: int = 1, **options: object) -> ClusterSetup:
    values: dict = {"startup_s": 60.0, "idle_timeout_s": 300.0, "autoscaler_interval_s": 1.0,
                    "scaling_efficiency": 1.0, **options}
    return ClusterSetup("test", (NodeType("node", worker_slots=slots, max_nodes=max_nodes),), **values)


def test_one_job_on_an_empty_cluster_waits_exactly_the_node_start_up() -> None:
    result = simulate([_job("a", steps=100)], _setup(startup_s=60.0))
    (job,) = result.jobs
    assert job.queue_wait_s == 60.0
    assert job.completion_s == 60.0 + 100 * 1.0
    assert result.busy_worker_s == pytest.approx(100.0)


def test_an_idle_node_disappears_after_the_idle_timeout() -> None:
    # Launched at 0, up at 60, busy 60..160, idle from 160, removed at 160 + 300.
    result = simulate([_job("a", steps=100)], _setup(startup_s=60.0, idle_timeout_s=300.0))
    assert result.end_s == 460.0
    assert result.node_s == 460.0
    assert result.idle_node_s == 60.0 + 300.0  # booting, then waiting out the timeout
    assert result.utilisation == pytest.approx(100.0 / 460.0)
    nodes = dict(zip(result.series["t_s"], result.series["nodes"]))
    assert nodes[420.0] == 1 and 460.0 not in nodes  # sampled each 60 s; the run ends when the node goes


def test_a_node_idle_for_less_than_the_timeout_is_reused() -> None:
    # b arrives 100 s after a finishes (< 300 s idle timeout): same node, no second start-up wait.
    result = simulate([_job("a", steps=100), _job("b", arrival_s=260.0, steps=10)], _setup())
    assert [job.queue_wait_s for job in result.jobs] == [60.0, 0.0]
    assert max(result.series["nodes"]) == 1


def test_a_fixed_job_waits_for_its_whole_bundle_set_an_elastic_one_starts_on_min() -> None:
    # Static cluster of two 1-slot nodes; a holds one for 50 s; b wants 2 workers for 10 steps.
    jobs = [_job("a", steps=50), _job("b", steps=10, min_workers=1, max_workers=2, checkpoint_steps=5)]
    fixed = simulate(jobs, _setup(max_nodes=2, autoscaling=False))
    elastic = simulate(jobs, _setup(max_nodes=2, autoscaling=False, elastic=True))
    assert fixed.jobs[1].queue_wait_s == 50.0
    assert fixed.jobs[1].completion_s == 50.0 + 10 / 2  # two workers at efficiency 1
    assert elastic.jobs[1].queue_wait_s == 0.0
    assert elastic.jobs[1].completion_s == 10.0  # one worker throughout: a never frees its node in time
    assert elastic.jobs[1].workers_seen == [1]


def test_an_elastic_job_grows_at_the_checkpoint_after_a_node_joins() -> None:
    # One 1-slot node kept up; b (min 1, max 2, checkpoint every 10 steps) starts alone at 0. The autoscaler
    # launches a second node at 0 for b's missing worker: up at 60, when b is at step 60, a boundary.
    setup = ClusterSetup("grow", (NodeType("node", 1, max_nodes=2, min_nodes=1),), elastic=True,
                         startup_s=60.0, autoscaler_interval_s=1.0, scaling_efficiency=0.5)
    result = simulate([_job("b", steps=120, min_workers=1, max_workers=2, checkpoint_steps=10)], setup)
    (job,) = result.jobs
    assert job.workers_seen == [1, 2]
    # 60 steps alone (60 s), the rest at 1.5 steps/s: 60 / 1.5 = 40 s.
    assert job.finish_s == pytest.approx(100.0)
    assert job.lost_steps == 0


def test_an_elastic_job_loses_at_most_one_checkpoint_interval_on_a_node_loss() -> None:
    # Two 1-slot nodes up at 10; two workers step at 2 steps/s from 10; at 24 (step 28, checkpoint 20) the
    # busiest node is lost: back to step 20 on one worker. The autoscaler replaces the node at 25 (its
    # 5 s interval), up at 35; the job reaches the next checkpoint (40) at 44 and grows back to two workers,
    # then 60 steps at 2 steps/s: done at 74.
    setup = _setup(max_nodes=2, elastic=True, startup_s=10.0, autoscaler_interval_s=5.0)
    job = _job("a", steps=100, min_workers=1, max_workers=2, checkpoint_steps=10)
    result = simulate([job], setup, node_losses=[24.0])
    (outcome,) = result.jobs
    assert outcome.lost_steps == pytest.approx(8.0)
    assert outcome.lost_steps <= job.checkpoint_steps
    assert outcome.workers_seen == [2, 1, 2]
    assert outcome.finish_s == pytest.approx(74.0)


def test_a_fixed_job_on_a_lost_node_requeues_from_its_checkpoint() -> None:
    # Two workers from 10 at 2 steps/s; lost at 24 (step 28 -> 20). It needs both workers again: the
    # replacement (launched at 25) is up at 35, then 80 steps at 2 steps/s: done at 75.
    setup = _setup(max_nodes=2, startup_s=10.0, autoscaler_interval_s=5.0)
    job = _job("a", steps=100, min_workers=1, max_workers=2, checkpoint_steps=10)
    (outcome,) = simulate([job], setup, node_losses=[24.0]).jobs
    assert outcome.lost_steps == pytest.approx(8.0)
    assert outcome.workers_seen == [2, 2]
    assert outcome.finish_s == pytest.approx(75.0)


def test_the_autoscaler_bin_packs_bundles_and_stops_at_max_nodes() -> None:
    # Three 3-worker jobs on 4-slot nodes: 9 bundles pack onto 3 nodes; with max_nodes=2 only 2 start
    # and the third job waits for the first two to finish.
    jobs = [_job(name, steps=30, min_workers=3, max_workers=3) for name in "abc"]
    roomy = simulate(jobs, _setup(slots=4, max_nodes=5))
    tight = simulate(jobs, _setup(slots=4, max_nodes=2))
    assert max(roomy.series["nodes"]) == 3
    assert [job.queue_wait_s for job in roomy.jobs] == [60.0, 60.0, 60.0]
    assert max(tight.series["nodes"]) == 2
    assert sorted(job.queue_wait_s for job in tight.jobs) == [60.0, 60.0, 60.0 + 10.0]


def test_static_cluster_pays_for_every_node_all_day() -> None:
    result = simulate([_job("a", steps=100)], _setup(max_nodes=3, autoscaling=False, horizon_s=1000.0))
    assert result.jobs[0].queue_wait_s == 0.0
    assert result.node_s == 3 * 1000.0
    assert result.idle_node_s == 3 * 1000.0 - 100.0
    assert result.utilisation == pytest.approx(100.0 / 3000.0)


def test_a_job_that_can_never_fit_is_refused_naming_the_resources() -> None:
    with pytest.raises(ResourceError, match=r"needs 4 slot\(s\) but the largest node type has 2"):
        simulate([_job("big", worker_slots=4)], _setup(slots=2))
    with pytest.raises(ResourceError, match=r"needs 3 worker\(s\).*hold at most 2"):
        simulate([_job("wide", max_workers=3)], _setup(max_nodes=2))
    # An elastic job only needs its minimum to fit.
    assert simulate([_job("wide", max_workers=3)], _setup(max_nodes=2, elastic=True)).jobs[0].finish_s


def test_a_generated_day_drains_in_every_setup_and_the_books_balance() -> None:
    from llmstack.fleet import generate_day

    jobs = generate_day(seed=5, jobs_per_day=60)
    node_type = NodeType("node8", worker_slots=8, max_nodes=6)
    stepped = sum(job.max_workers * job.runtime_s(job.max_workers, 0.9) for job in jobs)
    for autoscaling, elastic, consolidate in ((False, False, False), (True, False, False), (True, True, False),
                                              (True, True, True)):
        setup = ClusterSetup("day", (node_type,), autoscaling=autoscaling, elastic=elastic, restart_s=30.0,
                             horizon_s=86_400.0, consolidate=consolidate)
        result = simulate(jobs, setup)
        assert all(job.finish_s is not None for job in result.jobs)
        assert result.busy_slot_s <= result.provisioned_slot_s == result.node_s * 8
        assert result.idle_node_s <= result.node_s
        assert all(job.queue_wait_s >= 0 and job.completion_s >= job.queue_wait_s for job in result.jobs)
        if not elastic:  # every job steps its whole run on max_workers: the work is the trace's own
            assert result.busy_worker_s == pytest.approx(stepped, rel=1e-9)


def test_consolidation_moves_a_job_off_the_emptiest_node_at_its_checkpoint_and_the_node_goes() -> None:
    # 2-slot nodes, start-up 10 s, restart 5 s, idle timeout 20 s. a (1 worker), b (2 workers, 20 steps) and c
    # (1 worker, checkpoint every 15 steps) arrive at 0: two nodes launched at 0, up at 10; a on node 0, b on
    # both, c on node 1; all step from 15. b ends at 25, leaving a alone on node 0 and c alone on node 1.
    # Consolidating, c reaches its checkpoint at 30 on node 1 (the drain target: the newer of two equally busy
    # nodes), restarts on node 0's free slot (stepping from 35, done at 120) and node 1 goes at 30 + 20.
    jobs = [_job("a", steps=100), _job("b", steps=20, min_workers=2, max_workers=2),
            _job("c", steps=100, checkpoint_steps=15)]
    options = {"slots": 2, "max_nodes": 2, "startup_s": 10.0, "idle_timeout_s": 20.0, "restart_s": 5.0,
               "elastic": True}
    plain = simulate(jobs, _setup(**options))
    packed = simulate(jobs, _setup(**options, consolidate=True))
    assert [job.finish_s for job in plain.jobs] == [115.0, 25.0, 115.0]
    assert plain.node_s == 2 * 135.0  # both nodes until the last job ends (115) plus the idle timeout
    a, b, c = packed.jobs
    assert (c.moves, c.workers_seen, c.lost_steps, c.finish_s) == (1, [1, 1], 0.0, 120.0)
    assert (a.moves, a.finish_s, b.finish_s) == (0, 115.0, 25.0)
    assert packed.node_s == 50.0 + 140.0  # node 1 until 50, node 0 until c ends (120) plus the idle timeout
    assert packed.busy_worker_s == plain.busy_worker_s
    assert packed.utilisation > plain.utilisation


def test_consolidation_needs_an_elastic_autoscaling_setup() -> None:
    from llmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="consolidate=True .* got elastic=False, autoscaling=True"):
        _setup(consolidate=True)


def test_booting_and_restarting_time_are_counted_apart() -> None:
    # One 2-slot node up at 60; a two-worker job (restart 30 s) steps from 90 to 140 (100 steps at 2/s).
    result = simulate([_job("a", steps=100, min_workers=2, max_workers=2)],
                      _setup(slots=2, startup_s=60.0, restart_s=30.0))
    assert result.booting_node_s == 60.0
    assert result.restarting_slot_s == 2 * 30.0
    assert result.busy_slot_s == pytest.approx(2 * 50.0)
