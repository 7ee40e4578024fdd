"""Which blocks each worker reads at each step, and the learning-rate schedule.

Pure functions of (step, rank, world size, seed): a resumed or restarted worker recomputes exactly
the batches it would have seen, so no data-loader state needs to be checkpointed.
"""

from __future__ import annotations

import math
from typing import Any


class BlockSampler:
    """Deterministic, disjoint sharding of ``num_blocks`` packed blocks across workers.

    Each epoch draws one permutation of all blocks (the same on every worker, seeded by ``seed`` and
    the epoch). Optimizer step ``s`` of the epoch takes the next ``per_step * world_size`` blocks of
    it as the global batch, and worker ``rank`` reads its ``per_step``-block slice. So no block is
    seen twice in an epoch across workers, and the global batch of a step does not depend on how
    it is split: 2 workers x 4 blocks, 1 worker x 8 blocks, or 1 worker x 2 blocks x 4
    accumulation steps all train on the same blocks. The tail that cannot fill a global batch is
    left out of that epoch (a new permutation covers it next epoch).

    Example:
        >>> s = BlockSampler(10, world_size=2, rank=1, per_step=2, seed=0)
        >>> s.steps_per_epoch, len(s.step_indices(0))
        (2, 2)
    """

    def __init__(self, num_blocks: int, *, world_size: int, rank: int, per_step: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.world_size = world_size
        self.rank = rank
        self.per_step = per_step
        self.seed = seed
        self.global_per_step = per_step * world_size
        self.steps_per_epoch = num_blocks // self.global_per_step
        if self.steps_per_epoch < 1:
            raise ValueError(f"{num_blocks} blocks cannot fill one step of {per_step} blocks on each of "
                             f"{world_size} workers")
        self._epoch: int | None = None
        self._permutation: Any = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> Any:
        """The block order of ``epoch`` (a LongTensor of all ``num_blocks`` indices)."""
        import torch

        if self._epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_blocks, generator=generator)
            self._epoch = epoch
        return self._permutation

    def step_indices(self, step: int) -> Any:
        """Block indices this worker reads in optimizer step ``step``: ``per_step`` of them."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_per_step + self.rank * self.per_step
        return self.permutation(epoch)[start:start + self.per_step]


def eval_indices(num_blocks: int, *, world_size: int, rank: int, max_blocks: int) -> list[int]:
    """Held-out blocks this worker evaluates: strided, the same count on every worker.

    Every worker runs the same number of forward passes (FSDP needs all ranks in each all-gather);
    when there are fewer blocks than workers, indices wrap around.
    """
    if num_blocks <= 0:
        return []
    count = max(1, min(max_blocks, math.ceil(num_blocks / world_size)))
    return [(rank + world_size * i) % num_blocks for i in range(count)]


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
