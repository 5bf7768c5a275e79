"""The simulator's label source: the truth about some of a device's predictions, arriving late.

On a real device an app learns the truth for some predictions (the user corrects the device,
the outcome becomes known later) and posts a label for the inference id, which the agent joins
to its prediction (``Agent.label``). A simulated device does the same through the real agent;
this module decides *which* inferences get a label, *what* label, and *when*:

- ``share``: the chance that an inference served without error gets a label at all;
- the label: the simulator's inputs are synthetic, so there is no truth to look up. The label
  is drawn so that the model that served the inference was right with that model's configured
  probability (its true accuracy: the predicted class, or else another class uniformly). When
  the inputs come with their real labels (the demo's digits), the label is the real one, and the
  accuracy is the model's own;
- the delay: fixed, uniform between two bounds, or exponential with a mean.

Pure and seeded per device: the same plan labels the same inferences the same way, whichever
process the device runs in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DelayKind = Literal["fixed", "uniform", "exponential"]


@dataclass(frozen=True)
class LabelDelay:
    """How long after its inference a label arrives, in seconds."""

    kind: DelayKind = "fixed"
    a: float = 0.0  # fixed: the delay; uniform: the lower bound; exponential: the mean
    b: float = 0.0  # uniform: the upper bound

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0 or (self.kind == "uniform" and self.b < self.a):
            raise ValueError(f"a label delay is >= 0 (uniform: low <= high), got {self}")

    def draw(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exponential":
            return rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        return self.a


@dataclass(frozen=True)
class LabelPlan:
    """A fleet's label source as plain (picklable) data: it goes to every worker process."""

    share: float = 1.0  # of the inferences served without error, labelled
    delay: LabelDelay = field(default_factory=LabelDelay)
    accuracy: dict[str, float] = field(default_factory=dict)  # model sha256 -> its true accuracy
    truth: np.ndarray | None = None  # the real class of each row of the fleet's sample inputs
    outcome: str | None = None  # with each label the app also posts this outcome: 1 right, 0 wrong
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"share is a probability, got {self.share}")
        bad = {sha: p for sha, p in self.accuracy.items() if not 0 <= p <= 1}
        if bad:
            raise ValueError(f"accuracies are probabilities, got {bad}")

    def source(self, device_id: str) -> LabelSource:
        """The device's own stream of labels (seeded by its id: the same in any worker process)."""
        return LabelSource(self, random.Random(f"{self.seed}:labels:{device_id}"))


def draw_label(predicted: int, classes: int, accuracy: float, rng: random.Random) -> int:
    """The true class of an input the model classed as ``predicted``: the same class with
    probability ``accuracy``, else one of the ``classes - 1`` others, uniformly."""
    if classes <= 1 or rng.random() < accuracy:
        return predicted
    other = rng.randrange(classes - 1)
    return other if other < predicted else other + 1


def top1(outputs: list[np.ndarray]) -> tuple[int, int]:
    """(the predicted class, the number of classes) of a one-row classifier's first output."""
    scores = np.asarray(outputs[0]).reshape(-1)
    return int(np.argmax(scores)), int(scores.size)


class LabelSource:
    """One device's labels: for each inference, whether it gets one, which, and after how long."""

    def __init__(self, plan: LabelPlan, rng: random.Random) -> None:
        self.plan = plan
        self.rng = rng

    def label(
        self, model_sha256: str, outputs: list[np.ndarray], row: int | None
    ) -> tuple[int, float] | None:
        """(label, delay in seconds) for an inference served without error, or None (no label).

        ``row``: which row of the sample inputs it ran on (None: a random input), for the truth.
        """
        plan = self.plan
        truth = plan.truth
        if truth is not None and row is not None:
            if self.rng.random() >= plan.share:
                return None
            return int(truth[row % len(truth)]), plan.delay.draw(self.rng)
        accuracy = plan.accuracy.get(model_sha256)
        if accuracy is None or not outputs or self.rng.random() >= plan.share:
            return None  # a model without a configured accuracy is never labelled
        predicted, classes = top1(outputs)
        return draw_label(predicted, classes, accuracy, self.rng), plan.delay.draw(self.rng)


__all__ = ["LabelDelay", "LabelPlan", "LabelSource", "draw_label", "top1"]
