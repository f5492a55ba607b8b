from __future__ import annotations

import math

import pytest

from adadiff.config import DTSSConfig, MetricConfig, MetricKind
from adadiff.errors import ConfigError
from adadiff.runtime.policy import (
    Category,
    Decision,
    DTSSPolicy,
    FixedExitPolicy,
    RecordingPolicy,
    UniformPolicy,
    dtss_decide,
    exit_gain,
    gains,
    quality,
)

CFG = DTSSConfig()
TAU = CFG.tau


@pytest.mark.parametrize(
    ("t", "g_fr", "g_nr", "category", "interval"),
    [
        # first half: NR gains are zero, so never growth, never saturated
        (900, 0.0, 0.0, Category.STABLE, 20),
        (900, 0.5, 0.0, Category.STABLE, 15),
        (900, -0.5, 0.0, Category.STABLE, 15),
        (500, 0.0, -1.0, Category.STABLE, 20),  # t = 500 is still the first half
        # second half
        (499, 0.0, -TAU, Category.SATURATED, None),
        (100, 0.9, -0.2, Category.SATURATED, None),
        # growth: 10 while realism grows slowly, 5 once g_NR >= 4 tau (DESIGN.md)
        (499, TAU, TAU, Category.GROWTH, 10),
        (300, 0.3, 4 * TAU - 1e-6, Category.GROWTH, 10),
        (300, 0.3, 4 * TAU, Category.GROWTH, 5),
        (300, 0.3, 0.5, Category.GROWTH, 5),
        (300, TAU - 1e-6, 0.5, Category.STABLE, 20),
        (300, -0.3, 0.5, Category.STABLE, 15),
        (300, 0.3, TAU - 1e-6, Category.STABLE, 15),
        (300, 0.0, -TAU + 1e-6, Category.STABLE, 20),
    ],
)
def test_dtss_table(t, g_fr, g_nr, category, interval):
    d = dtss_decide(t, g_fr, g_nr, CFG)
    assert d.category is category
    assert d.interval == interval
    assert d.exits == (interval is None)


def test_policy_numbers_come_from_config():
    cfg = DTSSConfig(tau=0.1, tiers=(2, 3, 7, 11), growth_split=2.0, nr_start_t=800)
    assert dtss_decide(700, 0.15, 0.15, cfg).interval == 3
    assert dtss_decide(700, 0.15, 0.25, cfg).interval == 2
    assert dtss_decide(700, 0.05, 0.0, cfg).interval == 11
    assert dtss_decide(700, 0.5, 0.0, cfg).interval == 7
    assert dtss_decide(700, 0.0, -0.1, cfg).category is Category.SATURATED
    assert dtss_decide(850, 0.0, -0.5, cfg).category is Category.STABLE


def test_gains():
    metrics = (
        MetricConfig(name="a", kind=MetricKind.FULL_REFERENCE, weight=2.0),
        MetricConfig(name="b", kind=MetricKind.NO_REFERENCE, weight=-1.0),
        MetricConfig(name="c", kind=MetricKind.FULL_REFERENCE, weight=1.0),
    )
    r1 = quality([1.0, 3.0, 0.5], metrics)
    assert r1 == (2.5, -3.0)
    r2 = quality([1.1, 2.0, 0.5], metrics)
    assert gains(r2, None, 300, CFG) == (0.0, 0.0)
    g_fr, g_nr = gains(r2, r1, 300, CFG)
    assert g_fr == pytest.approx(math.tanh(0.2))
    assert g_nr == pytest.approx(math.tanh(1.0))
    assert gains(r2, r1, 700, CFG) == (pytest.approx(math.tanh(0.2)), 0.0)


def test_exit_on_total_watches_the_sum_of_both_gains():
    cfg = DTSSConfig(exit_on="total")
    # tanh(a + b) from tanh(a) and tanh(b): the exit sees the change of R_FR + R_NR
    a, b = 0.02, -0.03
    assert exit_gain(math.tanh(a), math.tanh(b), cfg) == pytest.approx(math.tanh(a + b))
    # the paper's rule would not exit here (g_NR > -tau); the total falls by more than tau
    assert dtss_decide(300, -0.02, 0.0, CFG).category is Category.STABLE
    assert dtss_decide(300, -0.02, 0.0, cfg).category is Category.SATURATED
    # and the total rising while R_NR falls keeps the tile going
    assert dtss_decide(300, 0.05, -0.01, CFG).category is Category.SATURATED
    assert dtss_decide(300, 0.05, -0.01, cfg).category is Category.STABLE
    # first half: never an exit
    assert dtss_decide(700, -0.5, 0.0, cfg).category is Category.STABLE
    with pytest.raises(ConfigError, match="exit_on"):
        DTSSConfig(exit_on="fr")


def test_exit_on_total_survives_gains_that_tanh_rounded_to_one():
    """Score changes beyond about 19 make tanh return exactly +1 or -1; opposite ones used to
    divide zero by zero in the tanh addition formula (ZeroDivisionError mid-run)."""
    cfg = DTSSConfig(exit_on="total")
    g_fr, g_nr = gains((125.0, -30.0), (100.0, 0.0), 100, cfg)
    assert (g_fr, g_nr) == (1.0, -1.0)
    assert exit_gain(g_fr, g_nr, cfg) == 0.0
    assert dtss_decide(100, g_fr, g_nr, cfg) == dtss_decide(100, 0.5, 0.0, CFG)  # stable, 15
    assert exit_gain(1.0, 1.0, cfg) == 1.0 and exit_gain(-1.0, -1.0, cfg) == -1.0


def test_new_config_fields_keep_the_digest_of_older_exports(tiny_config):
    """An export records the digest of the config it came from; fields added since
    (default_schedule, dtss.exit_on, noise.set_alpha_to_one, content, mmle.reference) must not
    change it while they keep their defaults."""
    import hashlib
    import json
    from dataclasses import replace

    from adadiff.config import ContentConfig

    old = tiny_config.to_dict()
    del old["default_schedule"], old["dtss"]["exit_on"], old["noise"]["set_alpha_to_one"]
    del old["content"], old["mmle"]["reference"]
    recorded = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert tiny_config.digest() == recorded
    # a model that sets them is another model to its exports
    assert replace(tiny_config, default_schedule="uniform").digest() != recorded
    calibrated = replace(tiny_config, dtss=DTSSConfig(exit_on="total"))
    assert calibrated.digest() != recorded
    noise = replace(tiny_config.noise, set_alpha_to_one=True)
    assert noise.set_alpha_to_one and not tiny_config.noise.set_alpha_to_one
    assert replace(tiny_config, noise=noise).digest() != recorded
    content = ContentConfig(threshold=0.2)
    assert replace(tiny_config, content=content).digest() != recorded
    hr = replace(tiny_config.mmle, reference="hr")
    assert replace(tiny_config, mmle=hr).digest() != recorded


def test_boundaries_of_the_stable_tiers_and_of_the_second_half():
    """|g_FR| == tau is already the 15 tier (20 only while |g_FR| < tau), and the NR gain is
    still zero at t == nr_start_t: the second half is t < nr_start_t, for gains as for exits."""
    assert dtss_decide(900, TAU, 0.0, CFG) == Decision(Category.STABLE, 15)
    assert dtss_decide(900, -TAU, 0.0, CFG) == Decision(Category.STABLE, 15)
    start = CFG.nr_start_t
    assert gains((0.0, 1.0), (0.0, 0.0), start, CFG) == (0.0, 0.0)
    assert gains((0.0, 1.0), (0.0, 0.0), start - 1, CFG) == (0.0, pytest.approx(math.tanh(1.0)))


def test_quality_names_both_counts_when_scores_and_metrics_differ():
    metrics = (MetricConfig(name="a", kind=MetricKind.FULL_REFERENCE, weight=1.0),)
    with pytest.raises(ValueError, match="got 2 scores for 1 metrics"):
        quality([1.0, 2.0], metrics)


def test_uniform_and_fixed_exit_policies_refuse_jumps_and_exits_below_one():
    with pytest.raises(ValueError, match="interval must be >= 1, got 0"):
        UniformPolicy(0)
    with pytest.raises(ValueError, match="interval must be >= 1, got 0"):
        FixedExitPolicy(0, 100)
    with pytest.raises(ValueError, match="exit_below must be >= 1, got 0"):
        FixedExitPolicy(20, 0)


def test_fixed_exit_policy_exits_at_its_first_step_below_the_threshold():
    policy = FixedExitPolicy(interval=50, exit_below=400)
    assert policy.decide(0, 400, 0.0, 0.0) == Decision(Category.STABLE, 50)
    assert policy.decide(0, 399, 0.0, 0.0) == Decision(Category.SATURATED, None)
    assert not policy.needs_scores


def test_recording_policy_keeps_each_decision_and_asks_what_its_inner_policy_asks():
    recording = RecordingPolicy(DTSSPolicy(CFG))
    assert recording.needs_scores
    assert not RecordingPolicy(UniformPolicy(20)).needs_scores
    decisions = [
        recording.decide(1, 900, 0.0, 0.0),
        recording.decide(0, 300, 0.3, 0.5),
        recording.decide(1, 300, 0.0, -1.0),
    ]
    assert decisions == [
        Decision(Category.STABLE, 20),
        Decision(Category.GROWTH, 5),
        Decision(Category.SATURATED, None),
    ]
    assert recording.rows == [
        (1, 900, 0.0, 0.0, "stable"),
        (0, 300, 0.3, 0.5, "growth"),
        (1, 300, 0.0, -1.0, "saturated"),
    ]
    assert recording.categories() == {1: ["stable", "saturated"], 0: ["growth"]}
