"""Sequences decoded together: one left-padded prefill, then one forward pass per step, a shared KV cache."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

from llmstack.serve.engine.output import extend_text
from llmstack.serve.engine.sampling import adjust_logits, choice_seed, random_seed, sample_token, token_logprobs
from llmstack.serve.engine.work import Row, Work

if TYPE_CHECKING:
    from llmstack.serve.engine.prefix_cache import PrefixCache


class BatchModel(Protocol):
    """What a batch decodes with: the model's forward pass, its KV caches and a few facts about it."""

    tokenizer: Any
    device: Any  # where the model's inputs go
    eos_ids: Collection[int]
    max_model_len: int
    contiguous_prefill: bool  # sliding-window layers: a row's cached and new prompt tokens must be adjacent
    prefix_cache: PrefixCache | None

    def new_cache(self) -> Any:
        """An empty KV cache for a prefill (None: the model builds its own, which cannot be merged)."""

    def prefix_namespace(self, adapter: str | None) -> str:
        """What prefix-cache keys computed under ``adapter``'s weights share."""

    def forward(self, adapter: str | None, **inputs: Any) -> Any:
        """One forward pass with ``adapter`` active; ``cache`` is the KV cache or None."""


@dataclass
class StepStats:
    """What one prefill or decode step (or several, added up) did; the engine keeps the running totals."""

    batches: int = 0  # prefills
    forward_passes: int = 0
    generated_tokens: int = 0
    max_batch_size: int = 0  # most rows in one forward pass
    cancelled: int = 0  # works that ended cancelled
    prefix_queries: int = 0
    prefix_hits: int = 0
    prefix_hit_tokens: int = 0

    def add(self, other: StepStats) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name == "max_batch_size" else mine + theirs)

    def add_to(self, counters: dict[str, Any]) -> None:
        """Add these to an engine's counters of the same names (``max_batch_size`` as a running maximum)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_batch_size":
                counters[f.name] = max(counters.get(f.name, 0), value)
            else:
                counters[f.name] = counters.get(f.name, 0) + value


class Batch:
    """Sequences decoded together: left-padded tensors, a shared KV cache, and a row per sequence.

    Tensor row ``j`` is ``self.rows[j]``. Rows leave when they finish or their work is cancelled;
    another batch's rows join through :meth:`merge`.
    """

    def __init__(self, model: BatchModel, adapter: str | None, works: list[Work]) -> None:
        import torch

        self.model = model
        self.adapter = adapter
        self.rows: list[Row] = []
        for work in works:
            params = work.request.sampling
            for choice in range(params.n):
                generator = None
                if params.temperature > 0:
                    generator = torch.Generator()
                    seed = choice_seed(params.seed, choice) if params.seed is not None else random_seed()
                    generator.manual_seed(seed)
                work.rows.append(Row(work, choice, params, generator, work.max_tokens, len(work.prompt_ids)))
            if not work.cancelled:
                self.rows += work.rows
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T]: 1 where a real token sits in the KV cache
        self.positions: torch.Tensor | None = None  # [B, 1]: position of each row's last token
        self.logits: torch.Tensor | None = None

    @property
    def mergeable(self) -> bool:
        return cache_layers(self.cache) is not None

    # Each call runs on the engine thread and ends with sampling, so a token is sent as soon as it exists;
    # each returns what it did as StepStats.

    def prefill(self) -> StepStats:
        """One forward pass over the prompts, on top of the KV states of their longest cached block prefixes.

        Row ``j`` lays out as ``[pad | cached c_j | pad | rest r_j]`` along the sequence: both parts are
        left-padded to the widest, padding is masked and positions count real tokens only, so each row
        computes what it would alone. The prompts' new full blocks then go into the prefix cache.

        A model with sliding-window layers masks by cache column, so there a row's tokens must be adjacent:
        each row takes from the cache only what lies before the widest rest (``[pad | cached | rest]``) and
        recomputes the remainder of its cached blocks, in columns the forward pass covers anyway.
        """
        import torch

        now = time.time()
        for row in self.rows:
            row.work.started = now
        stats = StepStats()
        if not self.rows:
            return stats
        model = self.model
        stats.batches += 1
        cache = model.new_cache()
        store = model.prefix_cache if cache is not None else None
        namespace = model.prefix_namespace(self.adapter) if store is not None else ""
        hits: dict[int, list[Any]] = {}  # per work: its cached blocks' KV, looked up once for all its choices
        keys: dict[int, list[bytes]] = {}
        for row in self.rows:
            work = row.work
            if store is None or id(work) in hits:
                continue
            keys[id(work)] = store.block_keys(namespace, work.prompt_ids)
            usable = (len(work.prompt_ids) - 1) // store.block  # at least one token left to compute logits from
            hits[id(work)] = store.lookup(keys[id(work)][:usable])
            work.prefix_cached_tokens = len(hits[id(work)]) * store.block
            stats.prefix_queries += 1
            stats.prefix_hits += bool(hits[id(work)])
            stats.prefix_hit_tokens += work.prefix_cached_tokens
        cached = [row.work.prefix_cached_tokens or 0 for row in self.rows]
        if model.contiguous_prefill:
            widest = max(row.prompt_len - c for row, c in zip(self.rows, cached))
            cached = [min(c, max(0, row.prompt_len - widest)) for row, c in zip(self.rows, cached)]
            for row, c in zip(self.rows, cached):  # report what is really reused (the same for a work's choices)
                found = row.work.prefix_cached_tokens
                if found is not None and found != c:
                    stats.prefix_hit_tokens -= found - c
                    row.work.prefix_cached_tokens = c
        rest = [row.prompt_len - c for row, c in zip(self.rows, cached)]
        width_c, width_r = max(cached), max(rest)
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(self.rows), width_r), pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width_c + width_r), dtype=torch.long)
        for j, row in enumerate(self.rows):
            prompt = row.work.prompt_ids
            ids[j, width_r - rest[j]:] = torch.tensor(prompt[cached[j]:], dtype=torch.long)
            mask[j, width_c - cached[j]:width_c] = 1
            mask[j, width_c + width_r - rest[j]:] = 1
        if width_c:
            cache = self._cached_prefix(cache, [hits.get(id(row.work), []) for row in self.rows], cached, width_c)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width_c:]  # [B, width_r]: counting real tokens only
        self.mask = mask
        self._forward(ids, positions, cache=cache, stats=stats)
        self.positions = positions[:, -1:]
        if store is not None:
            self._store_blocks(store, namespace, keys, cached, rest, width_c + width_r)
        self._sample(stats)
        return stats

    def _cached_prefix(self, cache: Any, blocks: list[list[Any]], used: list[int], width: int) -> Any:
        """``cache`` filled, per layer, with the first ``used[j]`` tokens of row ``j``'s cached blocks,
        right-aligned in ``width`` columns."""
        import torch

        sample = next(b for b in blocks if b)[0]  # one block's per-layer (keys, values)
        for i, (layer, (k0, v0)) in enumerate(zip(cache.layers, sample)):
            keys = k0.new_zeros((len(blocks), k0.shape[0], width, k0.shape[-1]))  # [B, H, width, D]
            values = v0.new_zeros((len(blocks), v0.shape[0], width, v0.shape[-1]))
            for j, (row_blocks, n) in enumerate(zip(blocks, used)):
                if n:
                    keys[j, :, width - n:] = torch.cat([blk[i][0] for blk in row_blocks], dim=-2)[:, :n]
                    values[j, :, width - n:] = torch.cat([blk[i][1] for blk in row_blocks], dim=-2)[:, :n]
            layer.fill(keys, values)
        return cache

    def _store_blocks(self, store: Any, namespace: str, keys: dict[int, list[bytes]], cached: list[int],
                      rest: list[int], width: int) -> None:
        """Copy each prompt's full blocks past its cached part out of the batch's KV cache into ``store``."""
        layers = cache_layers(self.cache)
        done: set[int] = set()
        for j, row in enumerate(self.rows):
            work = row.work
            if id(work) in done:
                continue
            done.add(id(work))
            start = width - rest[j] - cached[j]  # prompt token t >= cached[j] sits in column start + t
            for b in range(cached[j] // store.block, len(keys[id(work)])):
                key = keys[id(work)][b]
                if key in store:
                    continue
                lo = start + b * store.block
                store.insert(key, namespace, [(layer.keys[j, :, lo:lo + store.block].clone(),
                                               layer.values[j, :, lo:lo + store.block].clone())
                                              for layer in layers])

    def step(self) -> StepStats:
        import torch

        stats = StepStats()
        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if not keep:
                self.cache = self.mask = self.positions = None
                return stats
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.model.device))
            self.mask, self.positions = self.mask[index], self.positions[index]
        last = torch.tensor([[row.ids[-1]] for row in self.rows], dtype=torch.long)  # [B, 1]
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self.positions = self.positions + 1
        self._forward(last, self.positions, cache=self.cache, stats=stats)
        self._sample(stats)
        return stats

    def merge(self, other: Batch) -> None:
        """Append ``other``'s rows: left-pad the shorter KV cache with masked slots, then stack."""
        import torch
        import torch.nn.functional as F

        # Drop finished rows first so the merged batch carries no dead weight.
        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[j] for j in keep]
            self.cache.batch_select_indices(index.to(self.model.device))
            self.mask, self.positions = self.mask[index], self.positions[index]
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = other.rows, other.cache, other.mask, other.positions
            return
        mine, theirs = cache_layers(self.cache), cache_layers(other.cache)
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(mine, theirs):
            pad_a, pad_b = width - a.keys.shape[-2], width - b.keys.shape[-2]
            a.keys = torch.cat([F.pad(a.keys, (0, 0, pad_a, 0)), F.pad(b.keys, (0, 0, pad_b, 0))], dim=0)
            a.values = torch.cat([F.pad(a.values, (0, 0, pad_a, 0)), F.pad(b.values, (0, 0, pad_b, 0))], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(other.mask, (width - other.mask.shape[1], 0))], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.rows = self.rows + other.rows

    def _forward(self, ids: Any, positions: Any, *, cache: Any, stats: StepStats) -> None:
        from llmstack.models.kv_cache import output_cache

        model = self.model
        device = model.device
        out = model.forward(self.adapter, input_ids=ids.to(device), attention_mask=self.mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1, cache=cache)
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1, :].float().cpu()  # [B, V]
        stats.max_batch_size = max(stats.max_batch_size, len(self.rows))
        stats.forward_passes += 1
        for row in self.rows:
            row.work.batch_size = max(row.work.batch_size, len(self.rows))

    def _sample(self, stats: StepStats) -> None:
        now = time.time()
        model = self.model
        for j, row in enumerate(self.rows):
            logits = adjust_logits(self.logits[j], row.params, row.ids)
            if row.params.ignore_eos or len(row.ids) < row.params.min_tokens:
                logits = logits.clone()
                logits[list(model.eos_ids)] = float("-inf")
            token = sample_token(logits, row.params, row.generator)
            row.ids.append(token)
            if row.params.logprobs is not None:
                row.logprobs.append(token_logprobs(logits, token, row.params.logprobs))
            if row.first_token_time is None:
                row.first_token_time = now
            stats.generated_tokens += 1
            if token in model.eos_ids:
                row.ids.pop()
                if row.params.logprobs is not None:
                    row.logprobs.pop()
                row.finish_reason = "stop"
                row.eos = True
            elif len(row.ids) >= row.max_tokens or row.prompt_len + len(row.ids) >= model.max_model_len:
                row.finish_reason = "length"
            extend_text(model.tokenizer, row)
            for stop in row.params.stop:  # only text not searched before can hold a new match
                at = row.text.find(stop, max(0, row.searched - len(stop) + 1))
                if at >= 0:
                    row.text = row.text[:at]
                    row.finish_reason = "stop"
            row.searched = len(row.settled)


def cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer key/value holders of a dynamic KV cache, or None when merging is not supported."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ in ("DynamicLayer", "GrowingLayer") for layer in layers):
        return None
    return list(layers)

