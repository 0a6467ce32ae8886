"""The match probability: a similarity score turned into P(same person), one definition read by
training (which fits it), the exporter (which stores it in the manifest) and the service
(which reports it). NumPy only.

Platt scaling, ``p = 1 / (1 + exp(-(a * score + b)))``, fitted on pairs of identities held out
of training. Positive and negative pairs are weighted 1/n1 and 1/n2, as the binomial deviance
weights them, so ``p`` is the probability at even prior odds: it does not depend on how many
people a gallery holds (a gallery of N people has about one matching pair in N, which a user
folds in when choosing a threshold; 0.5 is the equal-cost threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Calibration", "CalibrationError"]


class CalibrationError(ValueError):
    """A stored calibration is malformed."""


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a * score + b)``; ``a > 0`` so a higher score is never less likely."""

    a: float
    b: float
    method: str = "platt"
    pairs: int = 0          # held-out pairs it was fitted on
    positives: int = 0      # of which same-person pairs
    fitted_on: str = ""     # what data, in words

    def __post_init__(self) -> None:
        if self.method != "platt":
            raise CalibrationError(f"calibration method {self.method!r} is unknown (platt)")
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise CalibrationError(f"calibration {name} must be a finite number, "
                                       f"not {value!r}")
        if self.a <= 0:
            raise CalibrationError(f"calibration a must be positive, not {self.a}")

    def probability(self, scores: np.ndarray | float) -> np.ndarray:
        """Scores (any shape) -> probabilities in [0, 1], float64. NaN stays NaN."""
        z = self.a * np.asarray(scores, dtype=np.float64) + self.b
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, without overflow

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Calibration:
        if not isinstance(data, dict):
            raise CalibrationError(f"a calibration is a JSON object, not {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown or not {"a", "b"} <= set(data):
            raise CalibrationError(f"calibration keys must be among {sorted(known)} and hold "
                                   f"a and b; got {sorted(data)}")
        return cls(**data)
