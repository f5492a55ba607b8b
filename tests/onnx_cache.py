"""One export of the tiny model per test session, shared by test_export and test_onnxruntime.

A session fixture is defined once per test module that declares it; this cache makes both
modules' fixtures share the same folder, so the ~40 s export runs once.
"""

from __future__ import annotations

from pathlib import Path

_FOLDERS: dict[str, Path] = {}


def random_tiny(tmp_path_factory) -> Path:
    """The seeded random-init tiny model as a model folder (the same weights as conftest's
    ``tiny_models``): parity tests pin it, whatever weights ``--model tiny`` ships with."""
    if "random" not in _FOLDERS:
        from adadiff.models.bundle import build_random
        from adadiff.presets import tiny

        out = tmp_path_factory.mktemp("tiny-random")
        build_random(tiny(), seed=0).save(out)
        _FOLDERS["random"] = out
    return _FOLDERS["random"]


def tiny_export(tmp_path_factory) -> Path:
    """``adadiff export --model RANDOM_TINY`` with the default options (dynamo, opset 20, fp32)."""
    if "fp32" not in _FOLDERS:
        from adadiff.export import export_onnx

        out = tmp_path_factory.mktemp("tiny-onnx")
        export_onnx(random_tiny(tmp_path_factory), out)
        _FOLDERS["fp32"] = out
    return _FOLDERS["fp32"]


def copy_export(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
