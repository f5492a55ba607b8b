from __future__ import annotations

import numpy as np
import pytest

from adadiff.config import DEFAULT_METRICS, DTSSConfig, NoiseScheduleConfig
from adadiff.errors import ConfigError, NumericsError
from adadiff.runtime.policy import Category, Decision, DTSSPolicy, UniformPolicy
from adadiff.runtime.sampler import DenoiseNets, sample_tiles, tile_noise
from adadiff.runtime.schedule import alphas_cumprod

NOISE = NoiseScheduleConfig()
AC = alphas_cumprod(NOISE)
C, S = 4, 8


def oracle_nets(x0_true: np.ndarray, calls: list, scores=None) -> DenoiseNets:
    """A formula in place of the UNet: the exact noise that leads from z_t to the known x0."""

    def denoise(sample, t):
        calls.append(t.copy())
        z = sample[:, :C].astype(np.float64)
        a = AC[t.astype(int)][:, None, None, None]
        idx = sample[:, C, 0, 0].astype(int)  # the tile index rides in the conditioning
        return ((z - np.sqrt(a) * x0_true[idx]) / np.sqrt(1 - a)).astype(np.float32)

    def score(x0, lr, t):
        return scores(x0, lr, t) if scores else np.zeros((len(x0), 6), np.float32)

    def modulate(lr, gain):
        return lr

    return DenoiseNets(denoise, score, modulate)


def lr_with_index(n: int) -> np.ndarray:
    lr = np.zeros((n, C, S, S), np.float32)
    for k in range(n):
        lr[k, 0] = k
    return lr


def known_x0(n: int) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, C, S, S)).astype(np.float32)


def run(n, policy, *, max_batch=8, seed=0, scores=None, calls=None, x0=None, nets=None, **options):
    """``nets`` replaces the oracle (built from ``x0`` and ``scores``) when given; ``options``
    (grouping, progress) go to ``sample_tiles`` as they are."""
    if x0 is None:
        x0 = known_x0(n)
    calls = [] if calls is None else calls
    res = sample_tiles(
        lr_with_index(n),
        nets if nets is not None else oracle_nets(x0, calls, scores),
        policy,
        noise=NOISE,
        dtss=DTSSConfig(),
        metrics=DEFAULT_METRICS,
        gain_dim=2,
        seed=seed,
        max_batch=max_batch,
        **options,
    )
    return res, x0, calls


def test_oracle_network_recovers_known_x0():
    res, x0, _ = run(3, UniformPolicy(20))
    # Deterministic DDIM keeps the noise implied at the first step (z_999 is pure noise), so
    # z_0 = sqrt(a_0) x0 + sqrt(1 - a_0) eps with eps = (z_999 - sqrt(a_999) x0) / sqrt(1 - a_999).
    for k in range(3):
        eps = (tile_noise(0, k, (C, S, S)) - np.sqrt(AC[999]) * x0[k]) / np.sqrt(1 - AC[999])
        expected = np.sqrt(AC[0]) * x0[k] + np.sqrt(1 - AC[0]) * eps
        np.testing.assert_allclose(res.latents[k], expected, atol=1e-4)
    assert res.steps_per_tile == [50, 50, 50]
    assert res.exits == ["t0"] * 3


class ForcedIntervals:
    """Tile k always jumps by intervals[k]."""

    needs_scores = False

    def __init__(self, intervals):
        self.intervals = intervals

    def decide(self, tile, t, g_fr, g_nr):
        return Decision(Category.STABLE, self.intervals[tile])


def test_one_call_carries_different_timesteps_and_counts_add_up():
    intervals = [5, 10, 20, 20, 15]
    res, _, calls = run(5, ForcedIntervals(intervals), max_batch=2)
    assert any(len(set(c.tolist())) > 1 for c in calls), "no call mixed timesteps"
    assert any(len(set(b["timesteps"])) > 1 for b in res.batches)
    expected_steps = [len(range(999, 0, -i)) for i in intervals]
    assert res.steps_per_tile == expected_steps
    assert res.unet_evaluations == sum(expected_steps) == sum(len(c) for c in calls)
    # Every round chunks the tiles still active: the count of calls follows from the steps.
    active_per_round = [sum(s > r for s in expected_steps) for r in range(max(expected_steps))]
    assert res.rounds == max(expected_steps)
    assert res.engine_calls == len(calls) == sum(-(-a // 2) for a in active_per_round)
    assert [b["size"] for b in res.batches] == [len(c) for c in calls]


def test_saturated_exit_keeps_best_x0():
    n = 2

    class ExitAt:
        needs_scores = True

        def decide(self, tile, t, g_fr, g_nr):
            if t < 500:
                return Decision(Category.SATURATED, None)
            return Decision(Category.STABLE, 20)

    res, x0, _ = run(n, ExitAt())
    assert res.exits == ["saturated", "saturated"]
    # The oracle predicts the true x0 at every step, so the kept estimate is that x0.
    np.testing.assert_allclose(res.latents, x0, atol=1e-4)
    assert all(s == len(range(999, 480, -20)) for s in res.steps_per_tile)


def test_saturated_exit_keeps_the_best_second_half_x0():
    # x0 estimates drift with t, so the kept latent tells which step it came from.
    x0_true = np.random.default_rng(5).standard_normal((1, C, S, S)).astype(np.float32)

    def denoise(sample, t):
        z = sample[:, :C].astype(np.float64)
        a = AC[t.astype(int)][:, None, None, None]
        x0 = x0_true + (t / 1000.0)[:, None, None, None]
        return ((z - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)

    def score(x0, lr, t):
        out = np.zeros((len(t), 6), np.float32)
        # psnr (FR, weight > 0): highest for the blurry first-half estimates, then a second-half
        # peak at t = 459; the tile saturates at t = 419.
        out[:, 0] = np.where(t > 900, 1000.0, np.where(t == 459, 100.0, 0.0))
        return out

    class ExitBelow420:
        needs_scores = True

        def decide(self, tile, t, g_fr, g_nr):
            return Decision(Category.SATURATED, None) if t < 420 else Decision(Category.STABLE, 20)

    res = sample_tiles(
        lr_with_index(1),
        DenoiseNets(denoise, score, lambda lr, gain: lr),
        ExitBelow420(),
        noise=NOISE,
        dtss=DTSSConfig(),
        metrics=DEFAULT_METRICS,
        gain_dim=2,
        seed=0,
        max_batch=8,
    )
    assert res.exits == ["saturated"]
    np.testing.assert_allclose(res.latents[0], x0_true[0] + 0.459, atol=1e-4)


def test_dtss_with_scores_that_saturate_exits_early():
    # FR score rises every step; NR (brisque, weight < 0) rises sharply once t < 300: saturation.
    def scores(x0, lr, t):
        out = np.zeros((len(t), 6), np.float32)
        out[:, 0] = (1000 - t) / 10  # psnr: FR gain tanh(0.1 * 20 / 10)
        out[:, 4] = np.where(t < 300, 1000 - t, 0) * 10  # brisque up = worse
        return out

    res, _, _ = run(3, DTSSPolicy(DTSSConfig()), scores=scores)
    assert set(res.exits) == {"saturated"}
    assert max(res.steps_per_tile) < 50
    assert res.categories.get("saturated") == 3


@pytest.mark.parametrize("seed", [0, 3])
def test_batching_never_changes_results(seed):
    a, _, _ = run(5, ForcedIntervals([5, 20, 10, 15, 20]), max_batch=1, seed=seed)
    b, _, _ = run(5, ForcedIntervals([5, 20, 10, 15, 20]), max_batch=8, seed=seed)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-6)
    assert a.steps_per_tile == b.steps_per_tile
    assert a.engine_calls > b.engine_calls


def test_tile_noise_depends_on_seed_and_tile_only():
    a = tile_noise(7, 3, (4, 8, 8))
    np.testing.assert_array_equal(a, tile_noise(7, 3, (4, 8, 8)))
    assert not np.allclose(a, tile_noise(7, 4, (4, 8, 8)))
    assert not np.allclose(a, tile_noise(8, 3, (4, 8, 8)))
    # not a function of seed + tile: image 8's tile 3 is not image 7's tile 4
    assert not np.allclose(tile_noise(7, 4, (4, 8, 8)), tile_noise(8, 3, (4, 8, 8)))


@pytest.mark.parametrize("grouping", ["timestep", "tile"])
def test_grouping_changes_calls_not_results(grouping):
    policy = ForcedIntervals([5, 20, 10, 20, 20])
    ref, _, _ = run(5, policy, max_batch=8)
    calls: list = []
    x0 = np.random.default_rng(5).standard_normal((5, C, S, S)).astype(np.float32)
    other, _, _ = run(5, policy, max_batch=8, x0=x0, calls=calls, grouping=grouping)
    np.testing.assert_allclose(other.latents, ref.latents, atol=1e-6)
    assert other.steps_per_tile == ref.steps_per_tile
    assert other.engine_calls > ref.engine_calls
    if grouping == "tile":
        assert all(len(c) == 1 for c in calls)
    else:
        assert all(len(set(c.tolist())) == 1 for c in calls)


def test_real_policy_walks_every_category_through_the_sampler():
    """Scores scripted so that DTSS, in the real loop, takes stable 20 and 15, growth 10 and 5,
    then exits saturated; the UNet calls must land on exactly the timesteps those jumps give."""
    cfg = DTSSConfig()
    psnr_w, brisque_w = DEFAULT_METRICS[0].weight, DEFAULT_METRICS[4].weight
    r = {"fr": 0.0, "nr": 0.0, "late": 0}

    def scores(x0, lr, t):
        (step_t,) = t.astype(int)
        if step_t == 979:
            r["fr"] += 0.5  # |g_FR| >= tau in the first half: stable, 15
        elif step_t < cfg.nr_start_t:
            r["late"] += 1
            d_fr, d_nr = {1: (0.1, 0.01), 2: (0.1, 0.1), 3: (0.0, -0.1)}[r["late"]]
            r["fr"], r["nr"] = r["fr"] + d_fr, r["nr"] + d_nr
        out = np.zeros((1, 6), np.float32)
        out[0, 0], out[0, 4] = r["fr"] / psnr_w, r["nr"] / brisque_w
        return out

    expected = [999, 979, 964]
    while expected[-1] - 20 >= cfg.nr_start_t:
        expected.append(expected[-1] - 20)
    expected.append(expected[-1] - 20)  # the first second-half step: growth, g_NR < 4 tau
    expected += [expected[-1] - 10, expected[-1] - 15]  # growth 10, then growth 5
    calls: list = []
    res, _, _ = run(1, DTSSPolicy(cfg), scores=scores, calls=calls)
    assert [int(c[0]) for c in calls] == expected
    assert expected[-1] - expected[-2] == -5
    assert res.exits == ["saturated"]
    assert res.categories == {"stable": len(expected) - 3, "growth": 2, "saturated": 1}


def test_a_jump_of_zero_is_refused_instead_of_looping():
    with pytest.raises(ConfigError, match="jump of 0 timesteps"):
        run(2, ForcedIntervals([20, 0]))


def test_non_finite_unet_or_mmle_values_stop_the_run():
    def nan_scores(x0, lr, t):
        return np.full((len(x0), 6), np.nan, np.float32)

    class Scored(ForcedIntervals):
        needs_scores = True

    with pytest.raises(NumericsError, match="MMLE returned NaN"):
        run(2, Scored([20, 20]), scores=nan_scores)
    overflow = np.full((1, C, S, S), np.inf, np.float32)  # an oracle UNet that overflows
    with pytest.raises(NumericsError, match=r"UNet returned NaN or infinite values at t = \[999\]"):
        run(1, UniformPolicy(20), x0=overflow)


def test_finished_tiles_own_their_latents():
    """A finished tile's latent must not be a view of its call's batch: with tiles exiting in
    different rounds, each view kept a whole batch-sized array alive until the image ended."""
    from adadiff.runtime.sampler import TilePool

    class ExitAfterIndex:
        needs_scores = False

        def decide(self, tile, t, g_fr, g_nr):
            if 999 - t >= 100 * (tile % 3):
                return Decision(Category.SATURATED, None)
            return Decision(Category.STABLE, 100)

    n = 6
    x0 = np.random.default_rng(5).standard_normal((n, C, S, S)).astype(np.float32)
    pool = TilePool(
        oracle_nets(x0, []), noise=NOISE, dtss=DTSSConfig(), metrics=DEFAULT_METRICS,
        gain_dim=2, max_batch=8,
    )  # fmt: skip
    pool.add(0, lr_with_index(n), ExitAfterIndex(), seed=0)
    tiles = pool.members[0].tiles
    while not pool.round():
        pass
    assert len({s.steps for s in tiles}) > 1  # they left in different rounds
    assert all(s.result.base is None for s in tiles)
    uniform = TilePool(
        oracle_nets(x0, []), noise=NOISE, dtss=DTSSConfig(), metrics=DEFAULT_METRICS,
        gain_dim=2, max_batch=8,
    )  # fmt: skip
    uniform.add(0, lr_with_index(n), UniformPolicy(500), seed=0)
    tiles = uniform.members[0].tiles
    while not uniform.round():
        pass
    assert all(s.exit == "t0" and s.result.base is None for s in tiles)


@pytest.mark.parametrize("where", ["unet", "mmle"])
def test_non_finite_values_fail_only_their_own_image(where):
    """Images share UNet calls: NaN from one (an fp16 overflow) must not stop the others."""
    from adadiff.runtime.sampler import TilePool

    n = 3
    x0 = np.random.default_rng(5).standard_normal((2 * n, C, S, S)).astype(np.float32)
    if where == "unet":
        x0[n:] = np.inf  # the oracle UNet overflows on image b's tiles only

    def scores(x0_est, lr, t):
        out = np.zeros((len(x0_est), 6), np.float32)
        if where == "mmle":
            out[lr[:, 0, 0, 0] >= n] = np.nan
        return out

    scored = UniformPolicy(250, needs_scores=True)
    pool = TilePool(
        oracle_nets(x0, [], scores), noise=NOISE, dtss=DTSSConfig(), metrics=DEFAULT_METRICS,
        gain_dim=2, max_batch=8,
    )  # fmt: skip
    pool.add("a", lr_with_index(n), scored, seed=0)
    pool.add("b", lr_with_index(2 * n)[n:], scored, seed=1)
    done = {}
    for _ in range(10):
        done.update(pool.round())
        if not pool.members:
            break
    assert set(pool.failed) == {"b"} and isinstance(pool.failed["b"], NumericsError)
    assert set(done) == {"a"} and done["a"].steps_per_tile == [4] * n
    assert np.isfinite(done["a"].latents).all()


class RecordingPolicy:
    """Scored, jumps by 100 every step, and keeps the gains each tile was given."""

    needs_scores = True

    def __init__(self):
        self.seen: dict[int, list[tuple[int, float, float]]] = {}

    def decide(self, tile, t, g_fr, g_nr):
        self.seen.setdefault(tile, []).append((t, g_fr, g_nr))
        return Decision(Category.STABLE, 100)


def test_pfj_gets_each_tiles_latest_gains_in_training_order_and_the_unet_its_output():
    """PFJ conditions a tile on (g_FR, g_NR) of its last step, in that order (training's
    ``sample_gains`` puts g_NR second and zero for t >= nr_start_t), refreshed after every round;
    the UNet's conditioning half is PFJ's latest output for that tile, whatever its batch."""
    n = 3
    inner = oracle_nets(known_x0(n), [])
    gains_given: dict[int, list[np.ndarray]] = {}
    latest: dict[int, np.ndarray] = {}
    checked = []

    def modulate(lr, gain):
        out = lr.copy()
        out[:, 1] = (gain[:, 0] * 10 + gain[:, 1] * 100)[:, None, None]
        for row, g, c in zip(lr, gain, out, strict=True):
            k = int(row[0, 0, 0])
            gains_given.setdefault(k, []).append(g.copy())
            latest[k] = c
        return out

    def denoise(sample, t):
        for row in sample:
            checked.append(np.array_equal(row[C:], latest[int(row[C, 0, 0])]))
        return inner.denoise(sample, t)

    def score(x0_, lr, t):  # FR and NR scores that grow at different rates as t falls
        cols = np.arange(1, 7, dtype=np.float32) * np.array([1, 1, 1, 1, -2, -3], np.float32)
        return ((1000 - t)[:, None] / 1000 * 0.4 * cols).astype(np.float32)

    policy = RecordingPolicy()
    # max_batch 2: tiles change batches between rounds
    res, _, _ = run(n, policy, max_batch=2, nets=DenoiseNets(denoise, score, modulate))
    assert res.steps_per_tile == [10] * n and all(checked) and len(checked) == 10 * n
    nr_start = DTSSConfig().nr_start_t
    for k in range(n):
        seen = policy.seen[k]
        assert len(gains_given[k]) == len(seen)  # at the start and after every step but the last
        np.testing.assert_array_equal(gains_given[k][0], [0.0, 0.0])
        for (t, g_fr, g_nr), given in zip(seen[:-1], gains_given[k][1:], strict=True):
            np.testing.assert_allclose(given, [g_fr, g_nr], rtol=1e-6)
            assert t < nr_start or given[1] == 0.0
    late = [g for t, *g in policy.seen[0][1:] if t < nr_start]
    assert late and all(g_fr != g_nr and g_nr != 0.0 for g_fr, g_nr in late)  # a swap shows


def test_a_tile_that_lands_on_one_takes_the_last_step_to_zero():
    res, _, calls = run(1, ForcedIntervals([998]))
    assert [int(c[0]) for c in calls] == [999, 1]
    assert res.steps_per_tile == [2] and res.exits == ["t0"]


def test_an_estimate_at_nr_start_t_does_not_compete_for_best():
    """The second half is t < nr_start_t: an estimate scored at exactly nr_start_t (however
    well) is not one a saturated exit may return."""
    start = DTSSConfig().nr_start_t
    x0_true = known_x0(1)

    def denoise(sample, t):
        z = sample[:, :C].astype(np.float64)
        a = AC[t.astype(int)][:, None, None, None]
        x0 = x0_true + (t / 1000.0)[:, None, None, None]  # the estimate tells its step
        return ((z - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)

    def score(x0, lr, t):
        out = np.zeros((len(t), 6), np.float32)
        out[:, 0] = np.where(t == start, 100.0, np.where(t == start - 1, 10.0, 0.0))
        return out

    class Walk:
        needs_scores = True

        def decide(self, tile, t, g_fr, g_nr):
            if t == 999:
                return Decision(Category.STABLE, 999 - start)
            if t > start - 2:
                return Decision(Category.STABLE, 1)
            return Decision(Category.SATURATED, None)

    res, _, _ = run(1, Walk(), nets=DenoiseNets(denoise, score, lambda lr, gain: lr))
    assert res.steps_per_tile == [4] and res.exits == ["saturated"]
    np.testing.assert_allclose(res.latents[0], x0_true[0] + (start - 1) / 1000, atol=1e-4)


@pytest.mark.parametrize("grouping", ["regroup", "timestep", "tile"])
def test_no_grouping_exceeds_max_batch(grouping):
    calls: list = []
    res, _, _ = run(5, ForcedIntervals([20] * 5), max_batch=2, calls=calls, grouping=grouping)
    assert max(len(c) for c in calls) <= 2
    assert res.steps_per_tile == [50] * 5


def test_progress_counts_exited_tiles_as_done():
    """A saturated tile leaves at its own t: progress counts it whole, and counts tiles done."""

    class FirstExits:
        needs_scores = False

        def decide(self, tile, t, g_fr, g_nr):
            return (
                Decision(Category.SATURATED, None) if tile == 0 else Decision(Category.STABLE, 500)
            )

    seen: list = []
    run(3, FirstExits(), progress=lambda *a: seen.append(a))
    total = 3 * 999
    assert seen == [
        ("tiles", 0, 3),
        ("denoise", 0, total),
        ("tiles", 1, 3),
        ("denoise", 999 + 500 + 500, total),
        ("tiles", 3, 3),
        ("denoise", total, total),
    ]


def test_pool_refuses_bad_batches_and_a_key_twice():
    from adadiff.runtime.sampler import TilePool

    nets = oracle_nets(known_x0(2), [])
    with pytest.raises(ConfigError, match="max_batch must be >= 1, got 0"):
        TilePool(
            nets, noise=NOISE, dtss=DTSSConfig(), metrics=DEFAULT_METRICS, gain_dim=2,
            max_batch=0,
        )  # fmt: skip
    pool = TilePool(
        nets, noise=NOISE, dtss=DTSSConfig(), metrics=DEFAULT_METRICS, gain_dim=2, max_batch=8
    )
    pool.add("a", lr_with_index(2), UniformPolicy(500), seed=0)
    with pytest.raises(ValueError, match="'a' is already in the pool"):
        pool.add("a", lr_with_index(2), UniformPolicy(500), seed=1)


def test_images_sharing_a_pool_count_whole_calls_and_keep_their_own_conditioning():
    """A batch's "size" counts the whole call, other images' tiles too; a scored image's tiles
    get fresh conditioning after every round even beside an image whose policy needs no scores."""
    from adadiff.runtime.sampler import TilePool

    inner = oracle_nets(known_x0(3), [])
    modulated: list[list[int]] = []

    def modulate(lr, gain):
        modulated.append([int(k) for k in lr[:, 0, 0, 0]])
        return lr

    pool = TilePool(
        DenoiseNets(inner.denoise, inner.score, modulate), noise=NOISE, dtss=DTSSConfig(),
        metrics=DEFAULT_METRICS, gain_dim=2, max_batch=8,
    )  # fmt: skip
    pool.add("scored", lr_with_index(2), UniformPolicy(500, needs_scores=True), seed=0)
    pool.add("plain", lr_with_index(3)[2:], UniformPolicy(500), seed=1)
    assert modulated == [[0, 1], [2]]
    done = dict(pool.round())
    assert not done and modulated[2:] == [[0, 1]]
    done = dict(pool.round())
    assert done["scored"].batches == [
        {"size": 3, "timesteps": [999, 999]},
        {"size": 3, "timesteps": [499, 499]},
    ]
    assert done["plain"].batches[0] == {"size": 3, "timesteps": [999]}
