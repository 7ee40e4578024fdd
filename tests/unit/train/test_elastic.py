"""Elastic workers: ``scaling.num_workers: [min, max]`` validation, its Ray Train mapping, and the global batch."""

from __future__ import annotations

import functools

import pytest

from llmstack.config import LoopConfig, TrainConfig, WorkersConfig, load_config
from llmstack.errors import ConfigError
from llmstack.train.driver import _ray_scaling, check_batch, run_cost
from llmstack.train.elastic import (global_batch_blocks, grad_accum_for, is_elastic, largest_step_blocks,
                                    ray_num_workers, worker_range)


def test_num_workers_accepts_an_int_or_a_min_max_pair() -> None:
    assert load_config(TrainConfig, {"scaling": {"num_workers": [1, 3]}}).scaling.num_workers == [1, 3]
    assert load_config(TrainConfig, {}, ["scaling.num_workers=[2, 2]"]).scaling.num_workers == [2, 2]
    assert load_config(TrainConfig, {}, ["scaling.num_workers=4"]).scaling.num_workers == 4


@pytest.mark.parametrize(("value", "message"), [
    ([3, 1], r"scaling\.num_workers: min must be <= max, got \[3, 1\]"),
    ([0, 2], r"scaling\.num_workers: min must be >= 1, got \[0, 2\]"),
    ([1, 2, 3], r"scaling\.num_workers: expected an integer or \[min, max\], got a list of 3"),
    ([1, "two"], r"scaling\.num_workers: expected an integer or a list, got list \[1, 'two'\]"),
    (2.5, r"scaling\.num_workers: expected an integer or a list, got float 2\.5"),
    (0, r"scaling\.num_workers: must be >= 1, got 0"),
])
def test_bad_num_workers_names_the_key_path(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, {"scaling": {"num_workers": value}})


def test_worker_range_and_the_ray_value() -> None:
    assert worker_range(3) == (3, 3) and worker_range([1, 4]) == (1, 4) and worker_range((2, 5)) == (2, 5)
    assert ray_num_workers(3) == 3
    assert ray_num_workers([1, 4]) == (1, 4)
    assert ray_num_workers([2, 2]) == 2  # no room to resize: a fixed-size run
    assert is_elastic([1, 4]) and not is_elastic([2, 2]) and not is_elastic(2)


def test_min_max_maps_to_ray_trains_elastic_scaling_config() -> None:
    elastic = _ray_scaling(WorkersConfig(num_workers=[1, 3], cpus_per_worker=2.0))
    assert elastic.num_workers == (1, 3)
    assert (elastic.min_workers, elastic.max_workers, elastic.elasticity_enabled) == (1, 3, True)
    assert elastic.resources_per_worker == {"CPU": 2.0}
    fixed = _ray_scaling(WorkersConfig(num_workers=2))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    assert elastic.elastic_resize_monitor_interval_s == 60.0  # Ray's default unless asked
    quick = _ray_scaling(WorkersConfig(num_workers=[1, 2], elastic_resize_interval_s=5.0))
    assert quick.elastic_resize_monitor_interval_s == 5.0
    with pytest.raises(ConfigError, match=r"scaling\.elastic_resize_interval_s: must be >= 0, got -1"):
        load_config(TrainConfig, {"scaling": {"elastic_resize_interval_s": -1}})


@pytest.mark.parametrize(("global_batch", "world", "micro", "expected"), [
    (32, 4, 8, 1),  # the full-size run: 4 x 8 x 1
    (32, 2, 8, 2),  # half the workers: twice the accumulation, same 32 blocks
    (32, 1, 8, 4),
    (32, 3, 8, 2),  # 3 x 8 does not divide 32: the next larger batch, 48
    (24, 5, 4, 2),  # 5 x 4 x 2 = 40 >= 24
    (8, 16, 1, 1),  # more workers than blocks: one micro-batch each
])
def test_accumulation_keeps_the_global_batch(global_batch: int, world: int, micro: int, expected: int) -> None:
    accumulation = grad_accum_for(global_batch=global_batch, world_size=world, micro_batch_size=micro)
    assert accumulation == expected
    assert world * micro * accumulation >= global_batch
    assert world * micro * (accumulation - 1) < global_batch  # never more than one micro-batch round too many


def test_global_batch_is_the_full_size_runs_and_the_largest_step_counts_rounding() -> None:
    assert global_batch_blocks(micro_batch_size=4, grad_accum_steps=2, num_workers=[1, 3]) == 24
    assert largest_step_blocks(micro_batch_size=4, grad_accum_steps=2, num_workers=[1, 3]) == 24  # 1x4x6, 2x4x3
    # global 12: 2 workers x 4 x ceil(12/8)=2 = 16 blocks is the largest step
    assert largest_step_blocks(micro_batch_size=4, grad_accum_steps=1, num_workers=[2, 3]) == 16
    assert largest_step_blocks(micro_batch_size=4, grad_accum_steps=2, num_workers=2) == 16


def test_check_batch_uses_the_largest_step_of_an_elastic_range() -> None:
    training = LoopConfig(micro_batch_size=4, grad_accum_steps=1)
    check_batch(training, WorkersConfig(num_workers=[2, 3]), num_blocks=16)
    with pytest.raises(ConfigError, match="16 blocks per step, but the training set has only 15"):
        check_batch(training, WorkersConfig(num_workers=[2, 3]), num_blocks=15)


def test_cost_of_an_elastic_run_is_bounded_by_its_max_workers() -> None:
    assert run_cost(3600.0, WorkersConfig(num_workers=[1, 3]))["worker_hours"] == pytest.approx(3.0)


def test_the_loop_derives_its_accumulation_from_the_global_batch() -> None:
    torch = pytest.importorskip("torch")
    from llmstack.train.driver import build_preset_model
    from llmstack.train.loop import LocalSession, LoopSpec, run_worker_loop

    generator = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(0, 16, (32, 8), generator=generator).repeat(1, 4)}
    spec = LoopSpec(model_factory=functools.partial(build_preset_model, "tiny", vocab_size=64, max_seq_len=64, seed=0))
    settings = {"max_steps": 2, "warmup_steps": 1, "checkpoint_every": 0, "eval_every": 10}
    # One worker of an elastic run whose full size was 2 workers x 4 blocks x 2 accumulation = 16 blocks.
    elastic = LocalSession()
    run_worker_loop(spec, data, None, LoopConfig(micro_batch_size=4, grad_accum_steps=2, **settings),
                    session=elastic, global_batch=16)
    reference = LocalSession()  # the same 16 blocks per step as one plain micro-batch
    run_worker_loop(spec, data, None, LoopConfig(micro_batch_size=16, grad_accum_steps=1, **settings),
                    session=reference)
    steps = [record for record in elastic.records if "loss" in record]
    assert [record["grad_accum_steps"] for record in steps] == [4, 4]
    assert [record["workers"] for record in steps] == [1, 1]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in reference.records if "loss" in r],
                                                       rel=1e-5, abs=1e-5)
