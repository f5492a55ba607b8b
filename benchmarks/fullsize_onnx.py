"""Full-size check: export the sd21-base UNet (random init), load it in ONNX Runtime, compare one
call with torch, and time both at a few batch sizes. Not part of CI: about 5 minutes and 8 GB of
disk and 10 GB of memory on a 2-core machine.

    python -m benchmarks.fullsize_onnx --work /tmp/fullsize --out runs/fullsize_onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from adadiff.argtypes import non_negative, positive
from adadiff.engines.onnxruntime import OnnxRuntimeBackend, OrtOptions
from adadiff.errors import AdadiffError
from adadiff.export import ExportOptions, export_onnx
from adadiff.export.verify import compare
from adadiff.models.bundle import build_random
from adadiff.presets import sd21_base
from adadiff.specs import component_specs
from benchmarks.machine import machine
from benchmarks.paths import check_out_file, check_out_folder


def interleaved(runs: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, dict]:
    """A warm-up call each, then ``repeats`` rounds alternating the runners, so that anything
    else on the machine slows both alike."""
    out: dict[str, dict] = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        result = fn()
        out[name] = {"first": time.perf_counter() - start, "times": [], "result": result}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            out[name]["times"].append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--batches", type=positive, nargs="+", default=[1, 2])
    p.add_argument(
        "--repeats", type=positive, default=2, help="timed calls per batch after a warm-up"
    )
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    p.add_argument(
        "--threads",
        type=non_negative,
        default=0,
        help="torch and ONNX Runtime threads (0: defaults)",
    )
    p.add_argument("--keep", action="store_true", help="keep the exported files")
    p.add_argument("--out", type=Path, default=Path("runs/fullsize_onnx.json"))
    args = p.parse_args(argv)
    try:  # before the minutes of export: a refused --out afterwards would lose them
        check_out_file(args.out)
        if args.work is not None:
            check_out_folder(args.work, "--work")
    except AdadiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="adadiff-fullsize-"))
    out_dir = work / "onnx"
    result: dict = {
        "machine": machine(),
        "exporter": args.exporter,
        "load_average_at_start": os.getloadavg(),
    }
    try:
        t0 = time.perf_counter()
        models = build_random(sd21_base(), seed=0)
        result["build_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"built sd21-base (random init) in {result['build_seconds']}s", flush=True)

        t0 = time.perf_counter()
        manifest = export_onnx(
            models,
            out_dir,
            ExportOptions(components=("unet",), exporter=args.exporter, check_batches=()),
        )
        entry = manifest.components["unet"]
        result["export_seconds"] = round(time.perf_counter() - t0, 2)
        result["export_stages"] = entry.seconds
        result["nodes"] = entry.nodes
        result["files"] = {f.path: f.size for f in entry.files}
        result["size_gb"] = round(entry.size / 1e9, 3)
        print(
            f"exported in {result['export_seconds']}s ({entry.seconds}), {result['size_gb']} GB "
            f"in {len(entry.files)} files, nodes {entry.nodes}",
            flush=True,
        )

        t0 = time.perf_counter()
        manifest.verify_files(out_dir, ["unet"])
        result["verify_sha256_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        options = OrtOptions(verify_files=False, intra_op_threads=args.threads)
        backend = OnnxRuntimeBackend(out_dir, options=options)
        engine = backend.open("unet")
        result["ort_load_seconds"] = round(time.perf_counter() - t0, 2)
        print(
            f"sha256 check {result['verify_sha256_seconds']}s, ORT session "
            f"{result['ort_load_seconds']}s",
            flush=True,
        )

        spec = component_specs(models.config)["unet"]
        wrapper = models.wrappers()["unet"]

        def run_torch(feeds: dict) -> np.ndarray:
            with torch.inference_mode():
                return wrapper(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()

        def run_ort(feeds: dict) -> np.ndarray:
            return engine(feeds)["noise_pred"]

        result["latency"] = {}
        for batch in args.batches:
            feeds = spec.sample_inputs(batch, seed=batch)
            runs = interleaved(
                {
                    "ort": partial(run_ort, feeds),
                    "torch": partial(run_torch, feeds),
                },
                args.repeats,
            )
            ok, err, ratio = compare(
                runs["ort"]["result"], runs["torch"]["result"], spec.fp32_tolerance
            )
            row = {
                "ort_seconds": round(statistics.median(runs["ort"]["times"]), 3),
                "torch_seconds": round(statistics.median(runs["torch"]["times"]), 3),
                "ort_all": [round(t, 3) for t in runs["ort"]["times"]],
                "torch_all": [round(t, 3) for t in runs["torch"]["times"]],
                "ort_first_call": round(runs["ort"]["first"], 3),
                "torch_first_call": round(runs["torch"]["first"], 3),
                "timesteps": feeds["timestep"].tolist(),
                "max_abs_error": err,
                "within_fp32_tolerance": ok,
                "tolerance_used": round(ratio, 4),
                "load_average": os.getloadavg(),
            }
            result["latency"][str(batch)] = row
            print(f"B={batch}: {row}", flush=True)
        result["torch_threads"] = torch.get_num_threads()
        result["ort_threads"] = args.threads or "default (one per physical core)"
        backend.close()
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
