"""Gains from MMLE scores and the DTSS policy: pure functions of plain numbers.

DTSS (dynamic time-step skipping) maps a tile's gains at timestep t to its next jump:

- saturated: t < nr_start_t and g_NR <= -tau (or, with ``exit_on = "total"``, the gain of
  R_FR + R_NR <= -tau) -> exit now, keeping the best x0 seen since t < nr_start_t (the sampler
  keeps it);
- growth: g_FR >= tau and g_NR >= tau -> tiers[1] while g_NR < growth_split * tau, else tiers[0]
  (the faster the no-reference score grows, the finer the steps);
- stable: anything else -> tiers[3] while |g_FR| < tau, else tiers[2].
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from adadiff.config import DTSSConfig, MetricConfig, MetricKind


class Category(str, enum.Enum):
    GROWTH = "growth"
    STABLE = "stable"
    SATURATED = "saturated"


@dataclass(frozen=True)
class Decision:
    category: Category
    interval: int | None  # None: the tile exits now

    @property
    def exits(self) -> bool:
        return self.interval is None


def quality(scores: Sequence[float], metrics: Sequence[MetricConfig]) -> tuple[float, float]:
    """(R_FR, R_NR): weighted sums of the full-reference and no-reference scores."""
    if len(scores) != len(metrics):
        raise ValueError(f"got {len(scores)} scores for {len(metrics)} metrics")
    r_fr = sum(
        m.weight * s
        for m, s in zip(metrics, scores, strict=True)
        if m.kind is MetricKind.FULL_REFERENCE
    )
    r_nr = sum(
        m.weight * s
        for m, s in zip(metrics, scores, strict=True)
        if m.kind is MetricKind.NO_REFERENCE
    )
    return float(r_fr), float(r_nr)


def gains(
    r: tuple[float, float], previous: tuple[float, float] | None, t: int, cfg: DTSSConfig
) -> tuple[float, float]:
    """(g_FR, g_NR) = tanh(R_i - R_{i-1}).

    Both are zero at a tile's first score; g_NR stays zero until t < nr_start_t.
    """
    if previous is None:
        return 0.0, 0.0
    g_fr = math.tanh(r[0] - previous[0])
    g_nr = math.tanh(r[1] - previous[1]) if t < cfg.nr_start_t else 0.0
    return g_fr, g_nr


def exit_gain(g_fr: float, g_nr: float, cfg: DTSSConfig) -> float:
    """The gain the saturated exit watches: g_NR (the paper) or, with ``exit_on = "total"``,
    tanh(dR_FR + dR_NR), which the tanh addition formula gives from the two gains."""
    if cfg.exit_on == "nr":
        return g_nr
    denominator = 1.0 + g_fr * g_nr
    if denominator == 0.0:
        # tanh rounded both gains to +1 and -1 (score changes beyond about 19 each way): the
        # sum's sign is lost with them, so the total counts as unchanged (no exit)
        return 0.0
    return (g_fr + g_nr) / denominator


def dtss_decide(t: int, g_fr: float, g_nr: float, cfg: DTSSConfig) -> Decision:
    tau = cfg.tau
    small, growth, stable, flat = cfg.tiers
    if t < cfg.nr_start_t and exit_gain(g_fr, g_nr, cfg) <= -tau:
        return Decision(Category.SATURATED, None)
    if g_fr >= tau and g_nr >= tau:
        return Decision(Category.GROWTH, growth if g_nr < cfg.growth_split * tau else small)
    return Decision(Category.STABLE, flat if abs(g_fr) < tau else stable)


class StepPolicy(Protocol):
    """What the sampler asks after every UNet call of a tile."""

    @property
    def needs_scores(self) -> bool: ...

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision: ...


@dataclass(frozen=True)
class DTSSPolicy:
    config: DTSSConfig
    needs_scores: bool = True

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        return dtss_decide(t, g_fr, g_nr, self.config)


@dataclass(frozen=True)
class UniformPolicy:
    """The baseline: every tile jumps by the same interval (20 -> 50 steps, 5 -> 200 steps)."""

    interval: int
    needs_scores: bool = False

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        return Decision(Category.STABLE, self.interval)


@dataclass
class RecordingPolicy:
    """Wraps a policy and keeps every decision: (tile, t, g_FR, g_NR, category), in call order.
    For measurements: which categories fired, at which gains."""

    inner: StepPolicy
    rows: list[tuple[int, int, float, float, str]] = field(default_factory=list)

    @property
    def needs_scores(self) -> bool:
        return self.inner.needs_scores

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        d = self.inner.decide(tile, t, g_fr, g_nr)
        self.rows.append((tile, t, g_fr, g_nr, d.category.value))
        return d

    def categories(self) -> dict[int, list[str]]:
        """Each tile's categories in call order."""
        out: dict[int, list[str]] = {}
        for tile, _t, _g_fr, _g_nr, category in self.rows:
            out.setdefault(tile, []).append(category)
        return out


@dataclass(frozen=True)
class FixedExitPolicy:
    """The simplest adaptive-free early exit: every tile jumps by ``interval`` and exits at its
    first step with t < ``exit_below``, returning that step's clean estimate. No MMLE calls.

    The baseline an adaptive schedule has to beat at equal cost: on a model whose late steps
    add grain, stopping every tile at the same point is already most of the gain.
    """

    interval: int
    exit_below: int
    needs_scores: bool = False

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.exit_below < 1:
            raise ValueError(f"exit_below must be >= 1, got {self.exit_below}")

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        if t < self.exit_below:
            return Decision(Category.SATURATED, None)
        return Decision(Category.STABLE, self.interval)
