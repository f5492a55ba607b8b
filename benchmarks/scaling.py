"""Section 4: time, tiles and peak memory against input size (square photos).

The uniform schedule keeps the work per tile fixed, so time should grow with the number of
tiles and no faster. Each size runs in a fresh Python process, because a process's peak
resident memory only ever grows: the child resets the kernel's high-water mark (VmHWM, via
/proc/self/clear_refs) after loading the model, so the peak it reports is the model plus that one
upscale; on CUDA it also reports torch's peak allocated memory. Where the reset is not allowed the
child falls back to ru_maxrss (model load included) and says so.

    python -m benchmarks.scaling --child '{"model": "tiny", "size": 64, ...}'   (internal)
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from adadiff.config import RunSettings
from benchmarks.suites import ROOT, Context, Progress, child_env, tiles_of

RESULT_PREFIX = "BENCH-RESULT "


def run(ctx: Context) -> dict[str, Any]:
    suite, settings = ctx.suite, ctx.settings
    config = ctx.upscaler().config
    work = {size: tiles_of(config, size, size) for size in suite.scaling_sizes}
    progress = Progress("scaling", sum(work.values()))
    variant = ctx.primary
    rows = []
    for size in suite.scaling_sizes:
        try:
            row = run_isolated(
                ctx,
                model=settings.model,
                backend=variant.backend,
                precision=variant.precision,
                photo="astronaut",
                size=size,
                schedule="uniform",
                interval=suite.scaling_interval,
                repeats=suite.scaling_repeats,
            )
        except RuntimeError as exc:
            row = {"size": size, "error": str(exc)}
        rows.append(row)
        progress.step(
            f"{size}x{size}: {row.get('tiles')} tiles, {row.get('seconds', {}).get('median')}s, "
            f"peak {row.get('memory', {}).get('peak_rss_mb')} MB",
            work[size],
        )
    return {
        "photo": "astronaut",
        "schedule": f"uniform, interval {suite.scaling_interval}",
        "backend": variant.label,
        "memory_method": "fresh process per size; VmHWM reset after loading (see module doc)",
        "rows": rows,
        "fit": fit(rows),
    }


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How time grows with tiles: the log-log slope (1.0 is linear) and seconds per tile at the
    largest size over the smallest."""
    ok = [r for r in rows if "error" not in r]
    if len(ok) < 2:
        return {}
    tiles = np.array([r["tiles"] for r in ok], dtype=float)
    secs = np.array([r["seconds"]["median"] for r in ok], dtype=float)
    per_tile = secs / tiles
    out: dict[str, Any] = {
        "seconds_per_tile": [round(float(v), 5) for v in per_tile],
        "per_tile_growth": round(float(per_tile[-1] / per_tile[0]), 4),
    }
    if len(set(tiles.tolist())) >= 2:
        slope = float(np.polyfit(np.log(tiles), np.log(secs), 1)[0])
        out["loglog_slope"] = round(slope, 4)
    return out


def run_isolated(
    ctx: Context,
    *,
    model: str,
    backend: str,
    precision: str,
    photo: str,
    size: int,
    schedule: str,
    interval: int | None,
    repeats: int,
) -> dict[str, Any]:
    """One upscale of ``photo`` at ``size`` in a fresh process; its measured row."""
    s = ctx.settings
    job = {
        "model": model,
        "backend": backend,
        "precision": precision,
        "device": s.device,
        "engines": str(ctx.export_dir(precision)) if backend != "torch" else None,
        "max_batch": s.max_batch,
        "threads": s.threads,
        "seed": s.seed,
        "photo": photo,
        "size": size,
        "schedule": schedule,
        "interval": interval,
        "repeats": repeats,
    }
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", json.dumps(job)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"size {size} failed (exit {done.returncode}): {tail}")


def _child(job: dict[str, Any]) -> dict[str, Any]:
    from adadiff import Upscaler, file_upscale
    from adadiff.demo import photo
    from adadiff.file_upscale import FileOutputs, UpscaleOptions
    from adadiff.imageio import save_image
    from benchmarks.suites import open_backend, warm_up
    from benchmarks.timing import measure

    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    config, backend = open_backend(
        RunSettings(
            model=job["model"],
            backend=job["backend"],
            device=job["device"],
            precision=job["precision"],
            engines=job["engines"],
            seed=job["seed"],
            max_batch=16,  # make_backend's profile default, not the job's --max-batch
            threads=job["threads"],
        )
    )
    up = Upscaler(config, backend, max_batch=job["max_batch"], model_name=job["model"])
    warm_up(up)
    load_seconds = time.perf_counter() - start
    img = photo(job["photo"], job["size"]).astype(np.float32) / 255.0
    # What `adadiff upscale` does with a file: read it, upscale into a uint8 canvas, write a PNG.
    work = Path(tempfile.mkdtemp(prefix="adadiff-scaling-"))
    source = save_image(work / "input.png", img)
    memory: dict[str, Any] = {"rss_after_load_mb": _status_mb("VmRSS") or _maxrss_mb()}
    memory["method"] = "VmHWM after reset" if _reset_peak() else "ru_maxrss (includes load)"
    cuda = job["device"] != "cpu"
    gpu = int(job["device"].split(":")[1]) if ":" in job["device"] else 0
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(gpu)
    options = UpscaleOptions(schedule=job["schedule"], interval=job["interval"], seed=job["seed"])

    def upscale_file() -> tuple[None, Any]:
        data = file_upscale.upscale_file(up, source, FileOutputs(work / "output.png"), options)
        return None, SimpleNamespace(**data)

    try:
        timing, (_, rep) = measure(
            upscale_file, repeats=job["repeats"], warmup=0, device=job["device"]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = _status_mb("VmHWM") if memory["method"].startswith("VmHWM") else _maxrss_mb()
    memory["peak_rss_mb"] = peak
    memory["upscale_extra_mb"] = round(peak - memory["rss_after_load_mb"], 1)
    if cuda:
        import torch

        # torch's allocator only: ONNX Runtime's arena and TensorRT's engines live outside it,
        # so the device's own figure (every allocation on it, after the runs) goes beside it
        memory["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(gpu) / 2**20, 1)
        free, total = torch.cuda.mem_get_info(gpu)
        memory["cuda_device_used_after_mb"] = round((total - free) / 2**20, 1)
    return {
        "size": job["size"],
        "model": job["model"],
        "schedule": job["schedule"],
        "interval": job["interval"],
        "input_size": [img.shape[1], img.shape[0]],
        "output_size": list(rep.output_size),
        "tiles": rep.tiles,
        "grid": list(rep.grid),
        "unet_evaluations": rep.unet_evaluations,
        "engine_calls": rep.engine_calls,
        "mean_batch": rep.mean_batch,
        "path": "file: read PNG, upscale into a uint8 canvas, write PNG",
        "seconds": timing.to_dict(),
        "seconds_per_tile": round(timing.median / rep.tiles, 5),
        "stages": rep.seconds,
        "components": rep.components,
        "load_seconds": round(load_seconds, 2),
        "memory": memory,
        "backend": up.backend.describe(),
    }


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        return None
    return None


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 1024), 1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one isolated upscale (used by the scaling section)")
    p.add_argument("--child", required=True, help="the job as JSON")
    args = p.parse_args(argv)
    row = _child(json.loads(args.child))
    print(RESULT_PREFIX + json.dumps(row, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
