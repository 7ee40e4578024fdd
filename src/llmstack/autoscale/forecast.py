"""Load forecasting: Holt-Winters (additive, damped trend) over a rate series, seasonal once the history allows.

Example:
    >>> f = HoltWinters(alpha=0.5, beta=0.3)
    >>> for y in [1, 2, 3, 4, 5]:
    ...     f.update(y)
    >>> f.forecast(3) > f.forecast(1) > 4  # the trend carries on
    True
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class HoltWinters:
    """Additive Holt-Winters with a damped trend; ``season`` is in steps (0: no seasonal term).

    The seasonal term joins only after two full seasons of history (its initial values are the mean
    deviation of those two seasons); before that it is Holt's linear method. Forecasts are clipped at 0.
    """

    alpha: float = 0.5  # level smoothing
    beta: float = 0.3  # trend smoothing
    gamma: float = 0.2  # seasonal smoothing
    phi: float = 0.9  # trend damping (1: undamped)
    season: int = 0  # season length in steps; 0 disables the seasonal term
    level: float | None = None
    trend: float = 0.0
    seasonal: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0
    _warmup: list[float] = dataclasses.field(default_factory=list, repr=False)

    @property
    def ready(self) -> bool:
        """True once two observations have given a level and a trend."""
        return self.steps >= 2

    @property
    def seasonal_active(self) -> bool:
        return bool(self.seasonal)

    def update(self, value: float) -> None:
        """Fold in the next observation of the series."""
        self.steps += 1
        if self.level is None:
            self.level = value
            self._remember(value)
            return
        s_now = self._season_term(0)
        previous_level = self.level
        self.level = self.alpha * (value - s_now) + (1 - self.alpha) * (previous_level + self.phi * self.trend)
        self.trend = self.beta * (self.level - previous_level) + (1 - self.beta) * self.phi * self.trend
        if self.seasonal:
            index = (self.steps - 1) % self.season
            self.seasonal[index] = self.gamma * (value - self.level) + (1 - self.gamma) * self.seasonal[index]
        self._remember(value)

    def forecast(self, steps_ahead: int) -> float:
        """The value expected ``steps_ahead`` (>= 1) observations after the last one (0 before any history)."""
        if self.level is None:
            return 0.0
        damped = sum(self.phi ** k for k in range(1, steps_ahead + 1))
        return max(0.0, self.level + damped * self.trend + self._season_term(steps_ahead))

    def _season_term(self, steps_ahead: int) -> float:
        if not self.seasonal:
            return 0.0
        return self.seasonal[(self.steps - 1 + steps_ahead) % self.season]

    def _remember(self, value: float) -> None:
        if self.season < 2 or self.seasonal:
            return
        self._warmup.append(value)
        if len(self._warmup) == 2 * self.season:
            first, second = self._warmup[: self.season], self._warmup[self.season:]
            m1, m2 = sum(first) / self.season, sum(second) / self.season
            self.seasonal = [((a - m1) + (b - m2)) / 2 for a, b in zip(first, second)]
            self._warmup = []
