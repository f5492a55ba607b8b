"""One export of the tiny model per test session, shared by test_export and test_onnxruntime.

A session fixture is defined once per test module that declares it; this cache makes both
modules' fixtures share the same folder, so the ~40 s export runs once.
"""

from __future__ import annotations

from pathlib import Path

_FOLDERS: dict[str, Path] = {}


def tiny_export(tmp_path_factory) -> Path:
    """``adadiff export --model tiny`` with the default options (dynamo, opset 20, fp32)."""
    if "fp32" not in _FOLDERS:
        from adadiff.export import export_onnx

        out = tmp_path_factory.mktemp("tiny-onnx")
        export_onnx("tiny", out)
        _FOLDERS["fp32"] = out
    return _FOLDERS["fp32"]


def copy_export(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
