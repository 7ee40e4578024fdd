"""Thresholds and sample sizes of the release gate (``llmstack validate``)."""

from __future__ import annotations

from dataclasses import dataclass

Problems = list[tuple[str, str]]


@dataclass
class ValidateConfig:
    """What counts as "no worse than the baseline", and how much evidence to collect.

    Defaults are set so that an identical copy and a faithful int8 quantization pass while corrupted
    weights, a model trained on other data and a clearly slower model fail (see tests/unit/validate).
    Load from YAML/dicts with ``llmstack.config.load_config(ValidateConfig, ...)``.
    """

    # -- output distribution shift (next-token distributions on the probe prompts)
    max_mean_kl: float = 0.05  # mean KL(baseline || candidate) per position, nats
    max_mean_js: float = 0.02  # mean Jensen-Shannon divergence per position, nats (at most ln 2)
    min_top1_agreement: float = 0.90  # share of positions where both models' argmax tokens agree
    # -- two-sample test on per-token log-likelihoods of held-out text (Kolmogorov-Smirnov)
    loglik_alpha: float = 0.01  # significance level of the KS test
    max_ks_statistic: float = 0.05  # effect size: a significant shift fails only above this KS distance
    # -- quality: held-out perplexity with a paired bootstrap CI of the relative change
    max_perplexity_increase: float = 0.05  # fail if the CI's upper bound of (ppl_c/ppl_b - 1) exceeds this
    bootstrap_samples: int = 1000  # bootstrap resamples over held-out blocks
    confidence: float = 0.95  # confidence level of the bootstrap interval
    max_eval_blocks: int = 32  # held-out blocks scored (each up to eval_block_size tokens)
    eval_block_size: int = 128  # tokens per held-out block (capped by the model's context)
    # -- performance: per-request latency, Mann-Whitney U and p95 ratio
    latency_requests: int = 24  # timed requests per model (interleaved between the two)
    latency_new_tokens: int = 8  # tokens generated per timed request
    latency_repeats: int = 3  # each sample is the median of this many back-to-back runs (filters scheduler noise)
    latency_warmup: int = 2  # untimed requests per model first
    latency_alpha: float = 0.01  # significance level of the one-sided Mann-Whitney U test
    max_latency_p50_ratio: float = 1.5  # fail if median(candidate)/median(baseline) exceeds this and the test agrees
    max_latency_p95_ratio: float = 1.5  # fail if p95(candidate)/p95(baseline) exceeds this and the test agrees
    # -- sanity
    generation_tokens: int = 16  # tokens generated per probe to look for empty outputs
    max_empty_fraction: float = 0.1  # tolerated share of empty generations (or the baseline's, if higher)
    seed: int = 0  # seed of the bootstrap

    def check(self) -> Problems:
        problems: Problems = []
        for name in ("max_mean_kl", "max_mean_js", "max_ks_statistic", "max_perplexity_increase"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        for name in ("min_top1_agreement", "max_empty_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append((name, f"must be in [0, 1], got {getattr(self, name)}"))
        for name in ("loglik_alpha", "latency_alpha", "confidence"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append((name, f"must be in (0, 1), got {getattr(self, name)}"))
        for name, low in (("bootstrap_samples", 100), ("max_eval_blocks", 2), ("eval_block_size", 8),
                          ("latency_requests", 5), ("latency_new_tokens", 1), ("latency_repeats", 1), ("latency_warmup", 0),
                          ("generation_tokens", 1)):
            if getattr(self, name) < low:
                problems.append((name, f"must be >= {low}, got {getattr(self, name)}"))
        for name in ("max_latency_p50_ratio", "max_latency_p95_ratio"):
            if getattr(self, name) < 1.0:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return problems
