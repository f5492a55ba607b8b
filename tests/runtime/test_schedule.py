from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from adadiff.config import NoiseScheduleConfig, PredictionType
from adadiff.errors import ConfigError
from adadiff.runtime.schedule import alphas_cumprod, ddim_jump, next_timestep, uniform_timesteps


def _diffusers(prediction: str, set_alpha_to_one: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=False,
        prediction_type=prediction,
    )


def test_alphas_cumprod_match_sd21():
    ours = alphas_cumprod(NoiseScheduleConfig())
    ref = _diffusers("epsilon").alphas_cumprod.numpy()
    assert ours.shape == (1000,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(ours) < 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("t", "interval"), [(999, 20), (999, 5), (620, 10), (380, 25), (19, 20), (4, 5)]
)
def test_ddim_jump_matches_diffusers_step(prediction, t, interval):
    cfg = NoiseScheduleConfig(prediction_type=PredictionType(prediction))
    sched = _diffusers(prediction)
    sched.set_timesteps(1000 // interval)  # step ratio = interval: prev = t - interval
    rng = np.random.default_rng(t)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = sched.step(torch.from_numpy(out), t, torch.from_numpy(z), eta=0.0)
    t_next = next_timestep(t, interval)
    ours, x0 = ddim_jump(z, out, np.full(2, t), np.full(2, t_next), cfg)
    np.testing.assert_allclose(ours, ref.prev_sample.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(x0, ref.pred_original_sample.numpy(), atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("t", "interval"), [(19, 20), (4, 5), (199, 200)])
def test_last_jump_returns_the_clean_estimate_with_set_alpha_to_one(prediction, t, interval):
    cfg = NoiseScheduleConfig(prediction_type=PredictionType(prediction), set_alpha_to_one=True)
    sched = _diffusers(prediction, set_alpha_to_one=True)
    sched.set_timesteps(1000 // interval)
    rng = np.random.default_rng(t)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = sched.step(torch.from_numpy(out), t, torch.from_numpy(z), eta=0.0)  # prev < 0
    ours, x0 = ddim_jump(z, out, np.full(2, t), np.zeros(2, np.int64), cfg)
    # the output is diffusers' float32 clean estimate: the x0 tolerance of the test above
    np.testing.assert_allclose(ours, ref.prev_sample.numpy(), atol=2e-5, rtol=1e-6)
    np.testing.assert_allclose(ours, x0, atol=1e-6)
    # Stable Diffusion's setting keeps a share of the predicted noise in the output
    sd, _ = ddim_jump(
        z,
        out,
        np.full(2, t),
        np.zeros(2, np.int64),
        NoiseScheduleConfig(prediction_type=PredictionType(prediction)),
    )
    assert np.abs(sd - x0).max() > 1e-3
    # jumps that do not land on 0 are the same either way
    mid, _ = ddim_jump(z, out, np.full(2, 999), np.full(2, 979), cfg)
    plain, _ = ddim_jump(
        z,
        out,
        np.full(2, 999),
        np.full(2, 979),
        NoiseScheduleConfig(prediction_type=PredictionType(prediction)),
    )
    np.testing.assert_array_equal(mid, plain)


def test_set_alpha_to_one_is_a_bool():
    with pytest.raises(ConfigError, match="set_alpha_to_one"):
        NoiseScheduleConfig(set_alpha_to_one="yes")  # type: ignore[arg-type]


def test_ddim_jump_per_sample_timesteps():
    cfg = NoiseScheduleConfig()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    out = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    t, t_next = np.array([999, 500, 20]), np.array([979, 495, 0])
    batched, _ = ddim_jump(z, out, t, t_next, cfg)
    for i in range(3):
        single, _ = ddim_jump(z[i : i + 1], out[i : i + 1], t[i : i + 1], t_next[i : i + 1], cfg)
        np.testing.assert_array_equal(batched[i], single[0])


def test_ddim_jump_refuses_upward_jumps():
    cfg = NoiseScheduleConfig()
    z = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="down"):
        ddim_jump(z, z, np.array([10]), np.array([10]), cfg)


@pytest.mark.parametrize(("interval", "count"), [(20, 50), (5, 200), (10, 100), (15, 67)])
def test_uniform_schedule_step_counts(interval, count):
    steps = uniform_timesteps(999, interval)
    assert len(steps) == count
    assert steps[0] == 999
    assert next_timestep(steps[-1], interval) == 0


def test_alphas_cumprod_are_read_only():
    """They are cached and shared: a caller writing into them would change every later jump."""
    ours = alphas_cumprod(NoiseScheduleConfig())
    with pytest.raises(ValueError, match="read-only"):
        ours[0] = 1.0


def test_ddim_jump_refuses_jumps_below_zero():
    """A negative index would silently read alpha_bar at the end of the schedule (t = 999)."""
    cfg = NoiseScheduleConfig()
    z = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="down to a timestep >= 0"):
        ddim_jump(z, z, np.array([10]), np.array([-1]), cfg)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_set_alpha_to_one_changes_only_the_jump_onto_zero(prediction):
    cfg = NoiseScheduleConfig(prediction_type=PredictionType(prediction), set_alpha_to_one=True)
    plain = NoiseScheduleConfig(prediction_type=PredictionType(prediction))
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t, t_next = np.array([20, 20]), np.array([1, 0])
    ours, x0 = ddim_jump(z, out, t, t_next, cfg)
    sd, _ = ddim_jump(z, out, t, t_next, plain)
    np.testing.assert_array_equal(ours[0], sd[0])  # t = 1 keeps alpha_bar_1
    np.testing.assert_allclose(ours[1], x0[1], atol=1e-6)


def test_uniform_schedule_refuses_an_interval_below_one():
    """An interval of 0 would never leave t_start."""
    with pytest.raises(ValueError, match="interval must be >= 1, got 0"):
        uniform_timesteps(999, 0)
