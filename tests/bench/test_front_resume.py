"""An interrupted front resumes from its saved runs and refuses runs of other weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package.
    sys.path.insert(0, str(ROOT))

import benchmarks.front as front  # noqa: E402
from adadiff.errors import ConfigError  # noqa: E402

# four tiles (one crop per hold-out photo), one seed: uniform-1, the fixed exit, DTSS
ARGS = ["--crops", "1", "--seeds", "1", "--uniform", "999", "--exit", "100@400"]
ARGS += ["--oracle-seeds", "0", "--threads", "1"]


def test_an_interrupted_front_resumes_where_it_stopped(tmp_path, metric_cache, monkeypatch):
    pytest.importorskip("skimage")
    out = tmp_path / "front"
    real = front.run_method
    calls: list[str] = []

    def stops_after_two(method, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends during the third run
        calls.append(method.label)
        return real(method, *a, **k)

    monkeypatch.setattr(front, "run_method", stops_after_two)
    with pytest.raises(KeyboardInterrupt):
        front.main(["--out", str(out), *ARGS])
    assert calls == ["uniform-1", "exit-100@400"]
    assert len(list((out / front.RUNS).glob("*-seed0.json"))) == 2
    assert not (out / "front.json").exists()

    resumed: list[str] = []

    def counting(method, *a, **k):
        resumed.append(method.label)
        return real(method, *a, **k)

    monkeypatch.setattr(front, "run_method", counting)
    assert front.main(["--out", str(out), *ARGS]) == 0
    assert resumed == ["dtss-mmle-model"]  # only the run that had not finished
    result = json.loads((out / "front.json").read_text())
    assert set(result["methods"]) == {"uniform-1", "exit-100@400", "dtss-mmle-model"}
    assert not (out / front.RUNS).exists()

    # the same front in one go gives the same figures
    monkeypatch.setattr(front, "run_method", real)
    assert front.main(["--out", str(tmp_path / "again"), *ARGS]) == 0
    again = json.loads((tmp_path / "again" / "front.json").read_text())
    for label, row in result["methods"].items():
        assert row["lpips"] == pytest.approx(again["methods"][label]["lpips"], abs=1e-6), label
        assert row["steps_per_tile"] == again["methods"][label]["steps_per_tile"], label


def test_saved_runs_of_other_weights_are_refused_and_kept(tmp_path):
    folder = tmp_path / front.RUNS
    store = front.RunStore(folder, {"weights": "a", "crops": 1})
    method = front.Method("uniform-1", "uniform", lambda _lr: None, interval=999)
    record = {"quality": {"lpips": [0.1]}, "steps": [1], "decisions": [], "seconds": 1.0}
    store.save(method, 0, record)
    assert front.RunStore(folder, {"weights": "a", "crops": 1}).load(method, 0)["steps"] == [1]
    # the same label defined otherwise (another interval) is not the same run
    other = front.Method("uniform-1", "uniform", lambda _lr: None, interval=500)
    assert store.load(other, 0) is None and store.load(method, 1) is None
    with pytest.raises(ConfigError, match=r"other weights .*delete that folder"):
        front.RunStore(folder, {"weights": "b", "crops": 1})
    assert len(front.RunStore(folder, {"weights": "a", "crops": 1})) == 1  # nothing was lost


def test_a_refused_resume_names_the_options_that_differ(tmp_path):
    """A front stopped at --max-batch 16 and run again at 8 (less memory) differs only there."""
    folder = tmp_path / front.RUNS
    setting = {"weights": "a", "photos": ["astronaut"], "crops": 16, "crop_seed": 0}
    front.RunStore(folder, {**setting, "max_batch": 16})
    with pytest.raises(ConfigError, match=r"measured with --max-batch 16 \(see") as caught:
        front.RunStore(folder, {**setting, "max_batch": 8})
    assert "weights" not in str(caught.value) and "crops" not in str(caught.value)
