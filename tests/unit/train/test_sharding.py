"""Data sharding and LR schedule: pure functions, no Ray, no model."""

from __future__ import annotations

import pytest

from llmstack.train.sharding import BlockSampler, eval_indices, warmup_cosine


def _epoch(num_blocks: int, world: int, per_step: int, epoch: int = 0) -> list[list[int]]:
    samplers = [BlockSampler(num_blocks, world_size=world, rank=r, per_step=per_step, seed=3) for r in range(world)]
    steps = range(epoch * samplers[0].steps_per_epoch, (epoch + 1) * samplers[0].steps_per_epoch)
    return [[int(i) for s in steps for i in sampler.step_indices(s)] for sampler in samplers]


def test_no_block_seen_twice_per_epoch_across_workers():
    per_worker = _epoch(103, world=3, per_step=4)
    seen = [i for worker in per_worker for i in worker]
    assert len(seen) == len(set(seen)) == 96  # 103 // 12 = 8 steps x 12 blocks; the tail waits
    assert all(len(worker) == 32 for worker in per_worker)  # every worker runs the same steps


def test_global_batch_independent_of_how_it_is_split():
    # 2 workers x 4 blocks and 1 worker x 8 blocks read the same blocks at every step.
    two = [BlockSampler(64, world_size=2, rank=r, per_step=4, seed=0) for r in range(2)]
    one = BlockSampler(64, world_size=1, rank=0, per_step=8, seed=0)
    for step in range(10):  # crosses an epoch boundary (8 steps per epoch)
        split = [int(i) for s in two for i in s.step_indices(step)]
        assert split == [int(i) for i in one.step_indices(step)]


def test_epochs_reshuffle_and_cover_everything():
    first, second = _epoch(40, 2, 5, epoch=0), _epoch(40, 2, 5, epoch=1)
    assert sorted(first[0] + first[1]) == sorted(second[0] + second[1]) == list(range(40))
    assert first != second


def test_deterministic_for_a_seed():
    a = BlockSampler(50, world_size=2, rank=1, per_step=3, seed=7)
    b = BlockSampler(50, world_size=2, rank=1, per_step=3, seed=7)
    assert [a.step_indices(s).tolist() for s in range(20)] == [b.step_indices(s).tolist() for s in range(20)]


def test_too_few_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot fill one step"):
        BlockSampler(7, world_size=2, rank=0, per_step=4, seed=0)


def test_eval_indices_equal_count_per_worker():
    shards = [eval_indices(5, world_size=2, rank=r, max_blocks=100) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert set(shards[0]) | set(shards[1]) == set(range(5))
    assert eval_indices(1, world_size=4, rank=3, max_blocks=8) == [0]  # wraps when blocks < workers
    assert eval_indices(100, world_size=2, rank=0, max_blocks=4) == [0, 2, 4, 6]


def test_warmup_then_cosine_to_floor():
    lr = [warmup_cosine(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    assert lr[20] == pytest.approx(0.1)
