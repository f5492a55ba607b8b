"""The full-size section: sd21-base (random init) on this machine, each part in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.scaling import run_isolated
from benchmarks.suites import ROOT, Context, child_env


def run_fullsize(ctx: Context) -> dict[str, Any]:
    """sd21-base (random init) on this machine: UNet latency torch against ONNX Runtime at
    B=1 and 2 (benchmarks.fullsize_onnx, in its own process) and one adaptive upscale of a
    small photo in a fresh process."""
    result: dict[str, Any] = {}
    out = ctx.work / "fullsize_onnx.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.fullsize_onnx",
        "--work",
        str(ctx.work / "fullsize"),
        "--batches",
        "1",
        "2",
        "--repeats",
        str(max(1, min(ctx.suite.repeats, 3))),
        "--out",
        str(out),
    ]
    print("[fullsize] sd21-base UNet export and latency (several minutes)", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if done.returncode == 0:
        data = json.loads(out.read_text())
        data.pop("machine", None)
        result["unet_latency"] = data
    else:
        result["unet_latency"] = {"error": _tail(done.stderr or done.stdout)}
    print("[fullsize] sd21-base adaptive upscale (several minutes)", flush=True)
    try:
        result["adaptive"] = run_isolated(
            ctx,
            model="sd21-base",
            backend="torch",
            precision=ctx.settings.precision,
            photo=ctx.suite.regroup_photo,
            size=ctx.suite.fullsize_size,
            schedule="adaptive",
            interval=None,
            repeats=1,
        )
    except RuntimeError as exc:
        result["adaptive"] = {"error": str(exc)}
    return result


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
