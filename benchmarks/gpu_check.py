"""The prepared GPU check: ``python -m benchmarks.gpu_check --out DIR`` on a machine with one
NVIDIA GPU and torch with CUDA (under 8 minutes); ``--dry-run`` imports and plans on any machine
(into ``DIR/gpu_check.dry.json``, beside a real run's figures).

Parts, each recorded in ``DIR/gpu_check.json`` (a part that fails keeps its error, the others run;
a run with a failed part goes to ``DIR/gpu_check.failed.json`` and leaves the figures there alone):

- parity: torch on CUDA against torch on the CPU (fp32 reference) in fp32, fp16 and bf16, per
  component, and end to end (tiny, adaptive): steps per tile, and where a tile's decision differs,
  how far its gains were from tau and 4*tau (a decision that close to a threshold may flip);
- unet_latency: sd21-base UNet (random init) per call at B = 1, 4, 8, 16 in fp16 and bf16, with
  the achieved TFLOP/s (FLOPs from benchmarks/flops.py);
- tiny_e2e: the tiny upscale on the GPU, tiles regrouped into shared calls vs tile by tile;
- shipped_photo: the shipped tiny on a hold-out photo (coffee, 128 px in, 512 px out) with its
  default schedule and with adaptive, on the CPU (fp32, the reference) and on the GPU in fp32,
  fp16 and bf16: seconds per tile, steps per tile and PSNR against the CPU image;
- peak GPU memory of each part;
- onnxruntime / tensorrt: run only where installed (ONNX Runtime's CUDA provider against torch;
  TensorRT build and parity through adadiff's backend), else recorded as skipped with the reason.

``python -m benchmarks report DIR/gpu_check.json`` writes the README's GPU check section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.devices import parse_device
from adadiff.errors import ConfigError, OutputPathError
from benchmarks.paths import check_out_folder

KIND = "gpu_check"
OUTPUT = "gpu_check.json"
DRY_OUTPUT = "gpu_check.dry.json"
FAILED_OUTPUT = "gpu_check.failed.json"  # a run with a failed part
PRECISIONS = ("fp32", "fp16", "bf16")
UNET_BATCHES = (1, 4, 8, 16)
UNET_PRECISIONS = ("fp16", "bf16")
PHOTO_PARTS = ("parity", "tiny_e2e", "shipped_photo")  # their photos come from scikit-image


@dataclass(frozen=True, kw_only=True)
class Plan:
    device: str = "cuda"
    parity_batch: int = 4
    precisions: tuple[str, ...] = PRECISIONS
    unet_batches: tuple[int, ...] = UNET_BATCHES
    unet_precisions: tuple[str, ...] = UNET_PRECISIONS
    unet_repeats: int = 10
    photo_size: int = 96  # long side of the tiny end-to-end input
    e2e_max_batch: int = 8
    shipped_size: int = 128  # LR side of the shipped-model photo
    shipped_schedules: tuple[str, ...] = ("default", "adaptive")
    parts: tuple[str, ...] = (
        "parity",
        "unet_latency",
        "tiny_e2e",
        "shipped_photo",
        "onnxruntime",
        "tensorrt",
    )
    optional: dict[str, bool] = field(default_factory=dict)  # library -> installed


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def make_plan(device: str) -> Plan:
    return Plan(
        device=device,
        optional={n: installed(n) for n in ("onnxruntime", "polygraphy", "tensorrt", "diffusers")},
    )


# -- helpers ------------------------------------------------------------------------------------


def _on_gpu(device: str) -> bool:
    return device.startswith("cuda")


def _reset_peak(torch: Any, device: str) -> None:
    if _on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)


def _peak(torch: Any, device: str) -> float | None:
    """Peak GPU memory in MiB since the last reset (None on the CPU, where the tests run)."""
    if not _on_gpu(device):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _sync(torch: Any, device: str) -> None:
    if _on_gpu(device):
        torch.cuda.synchronize(device)


def _photo(size: int, name: str = "astronaut") -> np.ndarray:
    """A scikit-image photo's centre square shrunk to ``size`` px."""
    from skimage import data
    from skimage.transform import resize

    img = getattr(data, name)()
    h, w = img.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = img[y0 : y0 + side, x0 : x0 + side]
    return resize(square, (size, size), anti_aliasing=True).astype(np.float32)


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return round(10 * np.log10(1.0 / max(mse, 1e-12)), 2)


class RecordingPolicy:
    """A policy wrapper that keeps every (tile, t, g_fr, g_nr, category) it decides."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.trace: list[tuple[int, int, float, float, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def decide(self, index: int, t: int, g_fr: float, g_nr: float) -> Any:
        decision = self.inner.decide(index, t, g_fr, g_nr)
        self.trace.append((index, int(t), float(g_fr), float(g_nr), decision.category.value))
        return decision


def first_divergence(a: list, b: list, tau: float) -> list[dict[str, Any]]:
    """Per tile, the first decision that differs between two traces, with the gains' distance
    from tau and 4*tau in each run."""
    out = []
    for tile in sorted({row[0] for row in a}):
        ta = [r for r in a if r[0] == tile]
        tb = [r for r in b if r[0] == tile]
        for ra, rb in zip(ta, tb, strict=False):
            if ra[4] != rb[4]:

                def dist(r: tuple) -> float:
                    return min(abs(r[2] - tau), abs(r[3] - tau), abs(r[3] - 4 * tau))

                out.append(
                    {
                        "tile": tile,
                        "t": ra[1],
                        "categories": [ra[4], rb[4]],
                        "gains_reference": [ra[2], ra[3]],
                        "gains_gpu": [rb[2], rb[3]],
                        "distance_from_tau": [round(dist(ra), 6), round(dist(rb), 6)],
                    }
                )
                break
    return out


# -- parts --------------------------------------------------------------------------------------


def part_parity(plan: Plan) -> dict[str, Any]:
    import torch

    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import build_random
    from adadiff.presets import tiny
    from adadiff.runtime.policy import DTSSPolicy
    from adadiff.runtime.upscaler import Upscaler
    from adadiff.specs import HALF_COMPONENTS, component_specs

    _reset_peak(torch, plan.device)
    cfg = tiny()
    ref = TorchBackend(build_random(cfg, seed=0), device="cpu")
    specs = component_specs(cfg)
    photo = _photo(plan.photo_size)
    ref_policy = RecordingPolicy(DTSSPolicy(cfg.dtss))
    ref_up = Upscaler(cfg, ref, max_batch=plan.e2e_max_batch)
    ref_img, ref_rep = ref_up.upscale(photo, seed=0, policy=ref_policy)
    out: dict[str, Any] = {"components": {}, "end_to_end": {}}
    for precision in plan.precisions:
        gpu = TorchBackend(build_random(cfg, seed=0), device=plan.device, precision=precision)
        rows = {}
        for name, spec in specs.items():
            feeds = spec.sample_inputs(plan.parity_batch, seed=1)
            (o,) = spec.output_names
            want = ref.open(name)(feeds)[o]
            got = gpu.open(name)(feeds)[o]
            # the VAE stays fp32 at every precision, so it is held to the fp32 tolerance
            half = precision != "fp32" and name in HALF_COMPONENTS
            tol = spec.fp16_tolerance if half else spec.fp32_tolerance
            err = np.abs(got - want)
            rows[name] = {
                "max_abs": float(err.max()),
                "max_rel": float((err / (np.abs(want) + 1e-6)).max()),
                "within_tolerance": bool(np.allclose(got, want, atol=tol.atol, rtol=tol.rtol)),
                "tolerance": [tol.atol, tol.rtol],
            }
        out["components"][precision] = rows
        policy = RecordingPolicy(DTSSPolicy(cfg.dtss))
        img, rep = Upscaler(cfg, gpu, max_batch=plan.e2e_max_batch).upscale(
            photo, seed=0, policy=policy
        )
        out["end_to_end"][precision] = {
            "same_steps": rep.steps_per_tile == ref_rep.steps_per_tile,
            "steps_reference": ref_rep.steps_per_tile,
            "steps_gpu": rep.steps_per_tile,
            "psnr_vs_cpu_db": _psnr_db(img, ref_img),
            "divergences": first_divergence(ref_policy.trace, policy.trace, cfg.dtss.tau),
        }
    out["peak_mib"] = _peak(torch, plan.device)
    return out


def part_unet_latency(plan: Plan) -> dict[str, Any]:
    import torch

    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import build_random
    from adadiff.presets import sd21_base
    from adadiff.specs import component_specs
    from benchmarks.flops import FlopCounter

    cfg = sd21_base()
    # FLOPs grow linearly in the batch (FlopCounter.linear_in_batch), so one B=1 count on the
    # CPU stands for every batch.
    per_tile = FlopCounter(build_random(cfg, seed=0)).per_call("unet", 1)
    spec = component_specs(cfg)["unet"]
    rows = []
    for precision in plan.unet_precisions:
        _reset_peak(torch, plan.device)
        backend = TorchBackend(build_random(cfg, seed=0), device=plan.device, precision=precision)
        engine = backend.open("unet")
        for batch in plan.unet_batches:
            feeds = spec.sample_inputs(batch, seed=0)
            engine(feeds)  # warm-up (cuDNN picks algorithms)
            _sync(torch, plan.device)
            times = []
            for _ in range(plan.unet_repeats):
                t0 = time.perf_counter()
                engine(feeds)
                _sync(torch, plan.device)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times) * 1e3)
            flops = per_tile * batch
            rows.append(
                {
                    "precision": precision,
                    "batch": batch,
                    "ms": round(ms, 3),
                    "ms_per_tile": round(ms / batch, 3),
                    "tflops": round(flops / (ms / 1e3) / 1e12, 2),
                    "peak_mib": _peak(torch, plan.device),
                }
            )
        backend.close()
        del engine, backend
        if _on_gpu(plan.device):
            torch.cuda.empty_cache()
    return {"rows": rows, "note": "per call, host copies included (TorchEngine takes numpy)"}


def part_tiny_e2e(plan: Plan) -> dict[str, Any]:
    import torch

    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import load_models
    from adadiff.runtime.upscaler import Upscaler

    _reset_peak(torch, plan.device)
    models = load_models("tiny")
    up = Upscaler(
        models.config, TorchBackend(models, device=plan.device), max_batch=plan.e2e_max_batch
    )
    photo = _photo(plan.photo_size)
    groupings = ("regroup", "tile")
    for grouping in groupings:  # each its own warm-up: they run different batch shapes
        up.upscale(photo, seed=0, grouping=grouping)
    times: dict[str, list[float]] = {g: [] for g in groupings}
    reports: dict[str, Any] = {}
    for repeat in range(3):  # interleaved, the order flipped each time, then medians
        for grouping in groupings if repeat % 2 == 0 else groupings[::-1]:
            _sync(torch, plan.device)
            t0 = time.perf_counter()
            _, reports[grouping] = up.upscale(photo, seed=0, grouping=grouping)
            _sync(torch, plan.device)
            times[grouping].append(time.perf_counter() - t0)
    rows: dict[str, Any] = {}
    for grouping in groupings:
        rep = reports[grouping]
        rows[grouping] = {
            "seconds": round(float(np.median(times[grouping])), 3),
            "repeats": len(times[grouping]),
            "engine_calls": rep.engine_calls,
            "unet_evaluations": rep.unet_evaluations,
            "tiles": rep.tiles,
        }
    rows["speedup"] = round(rows["tile"]["seconds"] / rows["regroup"]["seconds"], 2)
    rows["peak_mib"] = _peak(torch, plan.device)
    return rows


def part_shipped_photo(plan: Plan) -> dict[str, Any]:
    import torch

    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import load_models
    from adadiff.runtime.upscaler import Upscaler

    photo = _photo(plan.shipped_size, "coffee")  # a hold-out photo of the shipped tiny
    runs = [("cpu", "fp32")] + [(plan.device, p) for p in plan.precisions]
    reference: dict[str, tuple[np.ndarray, list[int]]] = {}
    rows = []
    for run_index, (device, precision) in enumerate(runs):
        _reset_peak(torch, device)
        models = load_models("tiny")  # fresh: an engine casts its module in place
        up = Upscaler(models.config, TorchBackend(models, device=device, precision=precision))
        for schedule in plan.shipped_schedules:
            chosen = None if schedule == "default" else schedule
            up.upscale(photo, seed=0, schedule=chosen)  # warm-up (cuDNN picks algorithms)
            t0 = time.perf_counter()
            img, rep = up.upscale(photo, seed=0, schedule=chosen)
            _sync(torch, device)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "device": "gpu" if _on_gpu(device) else "cpu",
                "precision": precision,
                "schedule": rep.schedule,
                "tiles": rep.tiles,
                "seconds": round(seconds, 3),
                "seconds_per_tile": round(seconds / rep.tiles, 4),
                "unet_evaluations": rep.unet_evaluations,
                "peak_mib": _peak(torch, device),
            }
            if run_index == 0:
                reference[schedule] = (img, rep.steps_per_tile)
            else:
                ref_img, ref_steps = reference[schedule]
                row["psnr_vs_cpu_db"] = _psnr_db(img, ref_img)
                row["same_steps"] = rep.steps_per_tile == ref_steps
            rows.append(row)
    threads = torch.get_num_threads()
    return {"photo": f"coffee, {plan.shipped_size} px", "cpu_threads": threads, "rows": rows}


def part_onnxruntime(plan: Plan) -> dict[str, Any]:
    import tempfile

    from adadiff.engines.onnxruntime import OnnxRuntimeBackend
    from adadiff.engines.torch import TorchBackend
    from adadiff.export import export_onnx
    from adadiff.models.bundle import build_random
    from adadiff.presets import tiny

    models = build_random(tiny(), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(models, Path(tmp))
        backend = OnnxRuntimeBackend(tmp, device=plan.device)
        return _component_parity(backend, TorchBackend(models), models.config)


def part_tensorrt(plan: Plan) -> dict[str, Any]:
    import tempfile

    from adadiff.artifacts import BatchProfile
    from adadiff.engines.tensorrt import TensorRTBackend
    from adadiff.engines.torch import TorchBackend
    from adadiff.export import export_onnx
    from adadiff.export.tensorrt_build import BuildOptions, build_engines
    from adadiff.models.bundle import build_random
    from adadiff.presets import tiny

    models = build_random(tiny(), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(models, Path(tmp))
        t0 = time.perf_counter()
        build_engines(tmp, BuildOptions(profiles=(BatchProfile(1, 4, 8),)), device=plan.device)
        built = round(time.perf_counter() - t0, 1)
        backend = TensorRTBackend(tmp, device=plan.device)
        out = _component_parity(backend, TorchBackend(models), models.config)
        backend.close()
    out["build_seconds"] = built
    return out


def _component_parity(backend: Any, ref: Any, cfg: Any) -> dict[str, Any]:
    from adadiff.specs import component_specs

    rows = {}
    for name, spec in component_specs(cfg).items():
        engine, want_engine = backend.open(name), ref.open(name)
        (o,) = spec.output_names
        worst = 0.0
        ok = True
        for batch in (1, 3, 8):
            feeds = spec.sample_inputs(batch, seed=batch)
            got, want = engine(feeds)[o], want_engine(feeds)[o]
            worst = max(worst, float(np.abs(got - want).max()))
            tol = spec.fp32_tolerance
            ok = ok and bool(np.allclose(got, want, atol=tol.atol * 10, rtol=tol.rtol * 10))
        rows[name] = {"max_abs": worst, "within_10x_fp32_tolerance": ok}
    return {"components": rows}


PARTS: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "parity": part_parity,
    "unet_latency": part_unet_latency,
    "tiny_e2e": part_tiny_e2e,
    "shipped_photo": part_shipped_photo,
    "onnxruntime": part_onnxruntime,
    "tensorrt": part_tensorrt,
}


def run(plan: Plan, out: Path, *, dry_run: bool = False) -> dict[str, Any]:
    from benchmarks.machine import machine, timed_section

    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"kind": KIND, "plan": asdict(plan), "dry_run": dry_run}
    if dry_run:
        result["planned"] = [p for p in plan.parts if _reason_to_skip(plan, p) is None]
        result["skipped"] = {p: r for p in plan.parts if (r := _reason_to_skip(plan, p))}
    else:
        start = time.perf_counter()
        result["seconds"] = {}
        for name in plan.parts:
            reason = _reason_to_skip(plan, name)
            if reason is not None:
                result[name] = {"skipped": reason}
                continue
            timed_section(name, lambda name=name: PARTS[name](plan), result)
        result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    result["machine"] = machine(plan.device)
    failed = failed_parts(result)
    (out / output_name(dry_run, failed)).write_text(json.dumps(result, indent=1) + "\n")
    if not dry_run and not failed:
        (out / FAILED_OUTPUT).unlink(missing_ok=True)
    return result


def failed_parts(result: dict[str, Any]) -> list[str]:
    return [p for p in PARTS if isinstance(result.get(p), dict) and "error" in result[p]]


def output_name(dry_run: bool, failed: list[str] | None = None) -> str:
    """A dry run, or a run with a failed part (a broken machine, say), writes beside a real
    run's figures, never over them."""
    if dry_run:
        return DRY_OUTPUT
    return FAILED_OUTPUT if failed else OUTPUT


def _dropped_parts(out: Path, plan: Plan) -> list[str]:
    """Parts the folder's real gpu_check.json holds that a run of ``plan`` would lose: left out
    of its parts, or with figures there and skipped here for a library this machine lacks."""
    try:
        old = json.loads((out / OUTPUT).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("dry_run"):
        return []

    def lost(part: str) -> bool:
        if part not in plan.parts:
            return True
        figures = isinstance(old[part], dict) and not {"skipped", "error"} & set(old[part])
        return figures and _reason_to_skip(plan, part) is not None

    return [p for p in PARTS if p in old and lost(p)]


def _reason_to_skip(plan: Plan, part: str) -> str | None:
    if part in ("onnxruntime", "tensorrt") and not plan.optional.get(part):
        return f"{part} is not installed"
    if part == "onnxruntime":
        # known before the run (the CPU-only package): it must not count as a run of the part
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDA provider"
    return None


def _missing_library(plan: Plan) -> str | None:
    """What the parts that would run lack, said before the run: else each of them fails on it
    and the run writes their errors over the folder's gpu_check.json."""
    parts = [p for p in plan.parts if _reason_to_skip(plan, p) is None]
    if parts and not installed("diffusers"):  # every model is built of diffusers modules
        return (
            f"the parts {', '.join(parts)} build their models with diffusers, which is not "
            "installed; pip install -e . (adadiff depends on it)"
        )
    needs_photos = [p for p in parts if p in PHOTO_PARTS]
    if needs_photos and not installed("skimage"):
        return (
            f"the parts {', '.join(needs_photos)} take their photos from scikit-image, which is "
            'not installed; pip install -e ".[demo]" (or choose other --parts)'
        )
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (the CPU is the reference)")
    p.add_argument("--dry-run", action="store_true", help="import and plan only (any machine)")
    p.add_argument("--parts", help=f"comma subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    try:
        check_out_folder(args.out)
    except OutputPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        device = parse_device(args.device, "torch")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.kind != "cuda":
        print(
            f"error: --device {args.device}: the GPU check runs on a CUDA device and compares it "
            "with the CPU; give cuda or cuda:N",
            file=sys.stderr,
        )
        return 2
    plan = make_plan(str(device))
    if args.parts is not None:
        chosen = tuple(x.strip() for x in args.parts.split(",") if x.strip())
        if not chosen:
            print(
                f"error: --parts {args.parts!r} names no part; give some of {','.join(PARTS)}",
                file=sys.stderr,
            )
            return 2
        unknown = sorted(set(chosen) - set(PARTS))
        if unknown:
            print(f"error: unknown parts {unknown}; choose from {list(PARTS)}", file=sys.stderr)
            return 2
        plan = Plan(**{**asdict(plan), "parts": chosen})
    missing = _missing_library(plan)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    dropped = [] if args.dry_run else _dropped_parts(args.out, plan)
    if dropped:
        why = [f"{p} ({_reason_to_skip(plan, p) or 'not in --parts'})" for p in dropped]
        print(
            f"error: {args.out / OUTPUT} holds the parts {', '.join(why)}, which this run "
            "would drop; give another --out (or delete that file)",
            file=sys.stderr,
        )
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "error: torch sees no CUDA device; run on a GPU machine, or use --dry-run",
                file=sys.stderr,
            )
            return 2
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            print(
                f"error: --device {args.device}: torch sees {count} CUDA device(s); use cuda:0 to "
                f"cuda:{count - 1} (check CUDA_VISIBLE_DEVICES)",
                file=sys.stderr,
            )
            return 2
    # every part's imports, so a dry run fails where a real run would
    import benchmarks.flops  # noqa: F401
    from adadiff.engines import torch as _torch_backend  # noqa: F401
    from adadiff.runtime import upscaler as _upscaler  # noqa: F401

    result = run(plan, args.out, dry_run=args.dry_run)
    failed = failed_parts(result)
    written = args.out / output_name(args.dry_run, failed)
    if failed:
        print(
            f"parts that failed: {', '.join(failed)}; the run is in {written} and "
            f"{args.out / OUTPUT} was left as it was",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
