from __future__ import annotations

import math

from llmstack.autoscale.forecast import HoltWinters


def test_holt_extrapolates_a_trend_and_never_goes_negative() -> None:
    f = HoltWinters(alpha=0.6, beta=0.4, phi=1.0)
    assert f.forecast(3) == 0.0 and not f.ready
    for t in range(30):
        f.update(2.0 * t)
    assert f.ready
    assert abs(f.forecast(5) - 2.0 * 34) < 1.0
    for _ in range(30):
        f.update(0.0)
    assert f.forecast(10) >= 0.0


def test_seasonal_term_joins_after_two_seasons_and_tracks_the_cycle() -> None:
    season = 12
    wave = [10 + 8 * math.sin(2 * math.pi * i / season) for i in range(season * 6)]
    seasonal, plain = HoltWinters(season=season), HoltWinters()
    for i, y in enumerate(wave):
        seasonal.update(y)
        plain.update(y)
        if i == 2 * season - 2:
            assert not seasonal.seasonal_active
    assert seasonal.seasonal_active
    truth = [10 + 8 * math.sin(2 * math.pi * (len(wave) + h - 1) / season) for h in range(1, season + 1)]
    err_seasonal = sum(abs(seasonal.forecast(h) - truth[h - 1]) for h in range(1, season + 1))
    err_plain = sum(abs(plain.forecast(h) - truth[h - 1]) for h in range(1, season + 1))
    assert err_seasonal < 0.1 * err_plain
