"""Elastic workers: ``scaling.num_workers: [min, max]`` on Ray Train's elastic ``ScalingConfig``.

Ray Train (V2) takes ``ScalingConfig(num_workers=(min, max))``: the run starts once ``min`` workers fit,
asks the autoscaler for ``max``, and restarts its worker group from the latest checkpoint to grow when
more fit or to shrink when a node is lost. The global batch stays the one of the full-size run
(``micro_batch_size * grad_accum_steps * max``): each (re)started worker group recomputes its gradient
accumulation from the world size it actually got, so the loss curve does not depend on the worker count.

Example:
    >>> worker_range([2, 4]), ray_num_workers([2, 4]), ray_num_workers(3)
    ((2, 4), (2, 4), 3)
    >>> grad_accum_for(global_batch=32, world_size=2, micro_batch_size=8)  # 2 x 8 x 2 = 32
    2
    >>> grad_accum_for(global_batch=32, world_size=3, micro_batch_size=8)  # 3 x 8 x 2 = 48 >= 32
    2
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def worker_range(num_workers: int | Sequence[int]) -> tuple[int, int]:
    """``(min, max)`` workers of a ``scaling.num_workers`` value (an int is ``(n, n)``)."""
    if isinstance(num_workers, int):
        return num_workers, num_workers
    low, high = num_workers
    return int(low), int(high)


def is_elastic(num_workers: int | Sequence[int]) -> bool:
    """Whether the run may change its worker count (``[min, max]`` with ``min < max``)."""
    low, high = worker_range(num_workers)
    return low < high


def ray_num_workers(num_workers: int | Sequence[int]) -> int | tuple[int, int]:
    """The ``num_workers`` of Ray Train's ``ScalingConfig``: a tuple (elastic) when min < max, else an int."""
    low, high = worker_range(num_workers)
    return (low, high) if low < high else high


def global_batch_blocks(*, micro_batch_size: int, grad_accum_steps: int, num_workers: int | Sequence[int]) -> int:
    """Blocks per optimizer step of the full-size run: ``micro_batch_size * grad_accum_steps * max``."""
    return micro_batch_size * grad_accum_steps * worker_range(num_workers)[1]


def grad_accum_for(*, global_batch: int, world_size: int, micro_batch_size: int) -> int:
    """Accumulation steps that keep ``global_batch`` on ``world_size`` workers: ``ceil(global / (world * micro))``.

    Exact when ``world_size * micro_batch_size`` divides the global batch; otherwise the step takes the
    next larger batch (never a smaller one).
    """
    if world_size < 1 or micro_batch_size < 1 or global_batch < 1:
        raise ValueError(f"need positive sizes, got global_batch={global_batch}, world_size={world_size}, "
                         f"micro_batch_size={micro_batch_size}")
    return math.ceil(global_batch / (world_size * micro_batch_size))


def largest_step_blocks(*, micro_batch_size: int, grad_accum_steps: int, num_workers: int | Sequence[int]) -> int:
    """The most blocks one optimizer step takes at any worker count in the range (rounding up included)."""
    low, high = worker_range(num_workers)
    global_batch = global_batch_blocks(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                       num_workers=num_workers)
    return max(world * micro_batch_size * grad_accum_for(global_batch=global_batch, world_size=world,
                                                          micro_batch_size=micro_batch_size)
               for world in range(low, high + 1))
