"""Sequences decoded together: one left-padded prefill, then one forward pass per step, a shared KV cache."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from llmstack.serve.engine.sampling import adjust_logits, choice_seed, random_seed, sample_token, token_logprobs
from llmstack.serve.engine.work import Row, Work

if TYPE_CHECKING:
    import torch

    from llmstack.serve.engine.transformers import TransformersEngine


class Batch:
    """Sequences decoded together: left-padded tensors, a shared KV cache, and a row per sequence.

    Tensor row ``j`` is ``self.rows[j]``. Rows leave when they finish or their work is cancelled;
    another batch's rows join through :meth:`merge`.
    """

    def __init__(self, engine: TransformersEngine, adapter: str | None, works: list[Work]) -> None:
        import torch

        self.engine = engine
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

    # Each call runs on the engine thread and ends with sampling, so a token is sent as soon as it exists.

    def prefill(self) -> None:
        import torch

        now = time.time()
        for row in self.rows:
            row.work.started = now
        if not self.rows:
            return
        self.engine.stats["batches"] += 1
        width = max(row.prompt_len for row in self.rows)
        pad = self.engine.tokenizer.pad_token_id if self.engine.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(self.rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for j, row in enumerate(self.rows):  # left padding: every prompt ends at the last column
            prompt = row.work.prompt_ids
            ids[j, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[j, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: each row counts from its first real token
        self.mask = mask
        self._forward(ids, positions, cache=None)
        self.positions = positions[:, -1:]
        self._sample()

    def step(self) -> None:
        import torch

        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if not keep:
                self.cache = self.mask = self.positions = None
                return
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.engine.device))
            self.mask, self.positions = self.mask[index], self.positions[index]
        last = torch.tensor([[row.ids[-1]] for row in self.rows], dtype=torch.long)  # [B, 1]
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self.positions = self.positions + 1
        self._forward(last, self.positions, cache=self.cache)
        self._sample()

    def merge(self, other: Batch) -> None:
        """Append ``other``'s rows: left-pad the shorter KV cache with masked slots, then stack."""
        import torch
        import torch.nn.functional as F

        # Drop finished rows first so the merged batch carries no dead weight.
        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None and not row.work.cancelled]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[j] for j in keep]
            self.cache.batch_select_indices(index.to(self.engine.device))
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

    def _forward(self, ids: Any, positions: Any, *, cache: Any) -> None:
        from llmstack.models.kv_cache import output_cache

        engine = self.engine
        device = engine.device
        out = engine.forward(self.adapter, input_ids=ids.to(device), attention_mask=self.mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1, cache=cache)
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1, :].float().cpu()  # [B, V]
        engine.stats["max_batch_size"] = max(engine.stats["max_batch_size"], len(self.rows))
        engine.stats["forward_passes"] += 1
        for row in self.rows:
            row.work.batch_size = max(row.work.batch_size, len(self.rows))

    def _sample(self) -> None:
        now = time.time()
        engine = self.engine
        for j, row in enumerate(self.rows):
            logits = adjust_logits(self.logits[j], row.params, row.ids)
            if row.params.ignore_eos or len(row.ids) < row.params.min_tokens:
                logits = logits.clone()
                logits[list(engine.eos_ids)] = float("-inf")
            token = sample_token(logits, row.params, row.generator)
            row.ids.append(token)
            if row.params.logprobs is not None:
                row.logprobs.append(token_logprobs(logits, token, row.params.logprobs))
            if row.first_token_time is None:
                row.first_token_time = now
            engine.stats["generated_tokens"] += 1
            if token in engine.eos_ids:
                row.ids.pop()
                if row.params.logprobs is not None:
                    row.logprobs.pop()
                row.finish_reason = "stop"
                row.eos = True
            elif len(row.ids) >= row.max_tokens or row.prompt_len + len(row.ids) >= engine.max_model_len:
                row.finish_reason = "length"
            row.text = engine.tokenizer.decode(row.ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
            for stop in row.params.stop:
                at = row.text.find(stop)
                if at >= 0:
                    row.text = row.text[:at]
                    row.finish_reason = "stop"


def cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer key/value holders of a dynamic KV cache, or None when merging is not supported."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        return None
    return list(layers)

