"""The statistics on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmstack.validate._stats import distribution_shift, ks_test, latency_test, perplexity_bootstrap


def test_distribution_shift_known_values() -> None:
    base = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    same = distribution_shift(base, base.clone())
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    cand = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    shift = distribution_shift(base, cand)
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert shift["mean_kl"] == pytest.approx(kl0 / 2, rel=1e-6)
    assert 0 < shift["mean_js"] < math.log(2)
    assert shift["positions"] == 2
    assert math.isnan(distribution_shift(base, torch.full((2, 2), float("nan")))["mean_kl"])


def test_ks_detects_shift_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    assert ks_test(a, b)["p_value"] > 0.01
    shifted = ks_test(a, b + 0.5)
    assert shifted["p_value"] < 1e-10 and shifted["statistic"] > 0.15
    assert math.isnan(ks_test(a, np.append(b, np.nan))["p_value"])


def test_perplexity_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.3, size=64)
    same = perplexity_bootstrap(base, base, samples=500, confidence=0.95, seed=0)
    assert same["relative_change"] == 0 and same["ci_low"] == same["ci_high"] == 0
    worse = perplexity_bootstrap(base, base + 0.1 + rng.normal(0, 0.01, 64), samples=500, confidence=0.95, seed=0)
    assert worse["ci_low"] < math.expm1(0.1) < worse["ci_high"]
    assert worse["ci_low"] > 0.08 and worse["candidate_perplexity"] > worse["baseline_perplexity"]


def test_latency_rank_test() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(0.010, 0.012, 20)
    slow = latency_test(base, base * 3)
    assert slow["p_value"] < 1e-6 and slow["p95_ratio"] == pytest.approx(3.0)
    assert latency_test(base, rng.permutation(base))["p_value"] > 0.1
