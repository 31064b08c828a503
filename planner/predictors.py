"""Predictors of the next interval's value of a load signal (request rate, ISL, OSL, hit rate).

`constant` (the last value), `ewma`, and `kalman`: a local-level Kalman filter (random-walk state,
noisy measurements), the one statistical model written here; its two variances are the knobs. An
interval without a sample (`None`: an idle window's averages) leaves every predictor unchanged, and a
predictor that never saw a sample predicts `None`.
"""

from __future__ import annotations

from enum import Enum


class PredictorKind(str, Enum):
    CONSTANT = "constant"
    EWMA = "ewma"
    KALMAN = "kalman"


class Predictor:
    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, sample: float | None) -> None:
        if sample is not None:
            self._update(float(sample))

    def _update(self, sample: float) -> None:
        self.value = sample

    def predict(self) -> float | None:
        return self.value


class Ewma(Predictor):
    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha

    def _update(self, sample: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value


class Kalman(Predictor):
    """x_t = x_{t-1} + w (var q);  z_t = x_t + v (var r, relative to the level's scale)."""

    def __init__(self, process_var: float = 0.1, measurement_var: float = 0.05):
        super().__init__()
        self.q, self.r = process_var, measurement_var
        self.p = 1.0  # variance of the estimate, in units of the level squared

    def _update(self, sample: float) -> None:
        if self.value is None:
            self.value, self.p = sample, self.r
            return
        p_prior = self.p + self.q
        gain = p_prior / (p_prior + self.r)
        self.value = self.value + gain * (sample - self.value)
        self.p = (1 - gain) * p_prior


def make_predictor(kind: PredictorKind | str) -> Predictor:
    kind = PredictorKind(kind)
    if kind is PredictorKind.EWMA:
        return Ewma()
    if kind is PredictorKind.KALMAN:
        return Kalman()
    return Predictor()
