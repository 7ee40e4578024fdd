"""The statistics behind the gate: divergences, a KS test, a paired bootstrap, a rank test.

Pure functions over tensors/arrays, so each can be tested on known inputs.
"""

from __future__ import annotations

import math
from typing import Any


def distribution_shift(base_logits: Any, cand_logits: Any) -> dict[str, float]:
    """Mean KL(base || cand), mean Jensen-Shannon divergence (nats) and top-1 agreement.

    Args:
        base_logits, cand_logits: ``[positions, vocab]`` logits of the two models at the same positions.
    """
    import torch

    logp = torch.log_softmax(base_logits.double(), dim=-1)  # [N, V]
    logq = torch.log_softmax(cand_logits.double(), dim=-1)
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum(-1).clamp_min(0.0)  # [N]; clamp float round-off below zero
    logm = torch.log((0.5 * (p + q)).clamp_min(1e-300))
    js = (0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)).clamp_min(0.0)
    top1 = (base_logits.argmax(-1) == cand_logits.argmax(-1)).double()
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "mean_js": float(js.mean()),
            "top1_agreement": float(top1.mean()), "positions": int(kl.numel())}


def ks_test(base: Any, cand: Any) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov test on two samples (e.g. per-token log-likelihoods)."""
    import numpy as np
    from scipy import stats

    base, cand = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if not (np.isfinite(base).all() and np.isfinite(cand).all()):
        return {"statistic": math.nan, "p_value": math.nan, "n": int(base.size)}
    result = stats.ks_2samp(base, cand)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "n": int(base.size)}


def perplexity_bootstrap(base_nll: Any, cand_nll: Any, *, samples: int, confidence: float,
                         seed: int) -> dict[str, float]:
    """Perplexities and a paired bootstrap CI of the relative change ``ppl_cand / ppl_base - 1``.

    Args:
        base_nll, cand_nll: mean next-token NLL per held-out block (equal token counts per block),
            paired: entry i of both is the same block.
    """
    import numpy as np

    base, cand = np.asarray(base_nll, dtype=np.float64), np.asarray(cand_nll, dtype=np.float64)
    diff = cand - base  # [blocks]
    out = {"baseline_perplexity": float(np.exp(base.mean())), "candidate_perplexity": float(np.exp(cand.mean())),
           "relative_change": float(np.expm1(diff.mean())), "blocks": int(diff.size)}
    if not np.isfinite(diff).all():
        return {**out, "ci_low": math.nan, "ci_high": math.nan}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(samples, diff.size))
    boot = np.expm1(diff[idx].mean(axis=1))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return {**out, "ci_low": float(low), "ci_high": float(high)}


def latency_test(base_s: Any, cand_s: Any) -> dict[str, float]:
    """One-sided Mann-Whitney U (is the candidate slower?) and the p50/p95 ratios."""
    import numpy as np
    from scipy import stats

    base, cand = np.asarray(base_s, dtype=np.float64), np.asarray(cand_s, dtype=np.float64)
    result = stats.mannwhitneyu(cand, base, alternative="greater")
    p95_b, p95_c = float(np.percentile(base, 95)), float(np.percentile(cand, 95))
    p50_b, p50_c = float(np.median(base)), float(np.median(cand))
    return {"p_value": float(result.pvalue), "u_statistic": float(result.statistic),
            "baseline_p50_ms": p50_b * 1e3, "candidate_p50_ms": p50_c * 1e3,
            "baseline_p95_ms": p95_b * 1e3, "candidate_p95_ms": p95_c * 1e3,
            "p50_ratio": p50_c / p50_b if p50_b > 0 else math.inf,
            "p95_ratio": p95_c / p95_b if p95_b > 0 else math.inf, "requests": int(cand.size)}
