"""Answers against labels as the subnet scores them: the validator's rounding and the confusion matrix, with its
accuracy and MCC."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def decide(probabilities: np.ndarray | list[float]) -> np.ndarray:
    """The subnet's rounding: roadwork only when P > 0.5 (exactly 0.5 counts as none)."""
    return np.asarray(probabilities, np.float64) > 0.5


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def of(cls, labels: np.ndarray | list[int], probabilities: np.ndarray | list[float]) -> Confusion:
        truth = np.asarray(labels).astype(bool)
        guess = decide(probabilities)
        assert truth.shape == guess.shape, (truth.shape, guess.shape)
        return cls(tp=int(np.sum(truth & guess)), fp=int(np.sum(~truth & guess)),
                   tn=int(np.sum(~truth & ~guess)), fn=int(np.sum(truth & ~guess)))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def mcc(self) -> float:
        """0 when a row or column of the matrix is empty (the usual convention; the formula is 0/0 there)."""
        denominator = math.sqrt((self.tp + self.fp) * (self.tp + self.fn) * (self.tn + self.fp) * (self.tn + self.fn))
        return (self.tp * self.tn - self.fp * self.fn) / denominator if denominator else 0.0

    def as_dict(self) -> dict:
        return {"n": self.n, "accuracy": round(self.accuracy, 4), "mcc": round(self.mcc, 4),
                "confusion": {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}}
