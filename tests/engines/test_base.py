"""The facades between the runtime and any backend: every call checked against its ModelSpec."""

from __future__ import annotations

import numpy as np
import pytest

from adadiff.engines.base import CallLog, PFJModule
from adadiff.errors import ShapeError
from adadiff.presets import tiny
from adadiff.specs import component_specs

PFJ = component_specs(tiny())["pfj"]


class Echo:
    """An engine that hands back the first ``keep`` tiles of its input as its output."""

    spec = PFJ

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self.fed: dict[str, np.ndarray] = {}

    def __call__(self, feeds):
        self.fed = dict(feeds)
        return {"modulated": feeds["lr_latent"][: self.keep]}

    def close(self) -> None:
        pass


def _feeds(batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
    return {k: v.astype(dtype) for k, v in PFJ.sample_inputs(batch).items()}


def test_a_facade_hands_the_engine_float32_and_counts_tiles():
    engine, log = Echo(), CallLog()
    out = PFJModule(engine, log).modulate(**_feeds(3, np.float64))
    assert out.shape[0] == 3
    assert all(a.dtype == np.float32 for a in engine.fed.values())
    assert log.as_dict()["pfj"]["calls"] == 1 and log.as_dict()["pfj"]["items"] == 3


def test_an_engine_that_answers_another_batch_is_refused():
    with pytest.raises(ShapeError, match="pfj returned batch 2 for input batch 3"):
        PFJModule(Echo(keep=2), CallLog()).modulate(**_feeds(3))


def test_inputs_that_do_not_fit_the_spec_are_refused():
    feeds = _feeds(3)
    with pytest.raises(ShapeError, match=r"pfj\.gain: expected shape"):
        PFJ.check_inputs({**feeds, "gain": feeds["gain"][:2]})  # batches of 3 and 2
    with pytest.raises(ShapeError, match=r"pfj\.lr_latent: expected float32, got float64"):
        PFJ.check_inputs({**feeds, "lr_latent": feeds["lr_latent"].astype(np.float64)})
    with pytest.raises(ShapeError, match="batch must be at least 1"):
        PFJ.check_inputs(_feeds(0))
    with pytest.raises(ShapeError, match=r"1 <= min <= opt <= max, got 2/1/4"):
        PFJ.profile(2, 1, 4)


def test_a_new_log_counts_the_calls_of_engines_opened_before_it():
    """One log per upscale: facades opened by an earlier upscale count into the new one."""
    from adadiff.engines.base import Components

    class Stub:
        name = "stub"

        def open(self, component: str) -> Echo:
            return Echo()

    components = Components(Stub())
    components.pfj.modulate(**_feeds(2))
    first = components.log
    log = components.new_log()
    components.pfj.modulate(**_feeds(3))
    assert (first.calls["pfj"], first.items["pfj"]) == (1, 2)
    assert (log.calls["pfj"], log.items["pfj"]) == (1, 3)
