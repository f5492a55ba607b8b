"""upscale-many throughput on a local Ray instance: 1 vs N workers, cross-image vs image by image.

python -m benchmarks.scaleout --images 24 --out benchmarks/reference/scaleout_cpu.json

Every run upscales the same folder of small photo crops (1 to 4 tiles each, the case where a
single image cannot fill an engine call) into a fresh output folder, one worker per
``--cpus-per-worker`` CPUs, and records the job report's throughput and the workers' mean
batch (UNet evaluations / UNet calls). Ray is started once; each run starts its own workers, so
"steady" throughput leaves out model loading and "whole job" includes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.argtypes import positive
from adadiff.errors import AdadiffError
from adadiff.scaleout.job import worker_threads
from benchmarks.machine import machine, weights_of

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page")
SIZES = ((32, 32), (32, 48), (48, 32), (48, 48))  # input px; 1, 2, 2 and 4 tiles for tiny


def make_folder(folder: Path, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` crops of scikit-image photos, sizes cycling through SIZES."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        photo = getattr(data, name)()
        if photo.ndim == 2:
            photo = np.repeat(photo[:, :, None], 3, axis=2)
        h, w = SIZES[i % len(SIZES)]
        y = int(rng.integers(0, photo.shape[0] - h))
        x = int(rng.integers(0, photo.shape[1] - w))
        Image.fromarray(np.ascontiguousarray(photo[y : y + h, x : x + w, :3])).save(
            folder / f"{i:03d}-{name}.png"
        )
        sizes.append((w, h))
    return sizes


def run_once(
    src: Path, workers: int, cross_image: bool, cpus_per_worker: float, args: argparse.Namespace
) -> dict[str, Any]:
    from adadiff.scaleout.job import ClusterOptions, run_job
    from adadiff.scaleout.plan import JobSettings

    out = Path(tempfile.mkdtemp(prefix="adadiff-scaleout-"))
    try:
        settings = JobSettings(model=args.model, max_batch=args.max_batch, seed=0)
        cluster = ClusterOptions(
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            cross_image=cross_image,
            queue=args.queue,
        )
        started = time.perf_counter()
        result = run_job(src, out, settings, cluster)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if result.count("done") != args.images:
        raise RuntimeError(f"only {result.count('done')} of {args.images} images were upscaled")
    evaluations = sum(w["unet_evaluations"] for w in result.workers)
    return {
        "workers": workers,
        "cross_image": cross_image,
        "cpus_per_worker": cpus_per_worker,
        "images": result.count("done"),
        "wall_seconds": round(wall, 2),
        "startup_seconds": round(result.startup_seconds, 2),
        "images_per_hour_whole_job": round(result.images_per_hour, 1),
        "images_per_hour_steady": round(result.steady_images_per_hour, 1),
        "mean_batch": round(result.mean_batch, 3),
        "unet_evaluations": evaluations,
        "unet_calls": sum(w["unet_calls"] for w in result.workers),
        "per_worker": result.workers,
    }


def median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median steady throughput, with every run's figure kept beside it."""
    ordered = sorted(rows, key=lambda r: r["images_per_hour_steady"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["repeats"] = len(rows)
    pick["images_per_hour_steady_all"] = [r["images_per_hour_steady"] for r in rows]
    return pick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=positive, default=24)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-batch", type=positive, default=8)
    p.add_argument("--queue", type=positive, default=None, help="images in flight per worker")
    p.add_argument("--max-workers", type=positive, default=2)
    p.add_argument(
        "--repeats",
        type=positive,
        default=3,
        help="runs per setting, interleaved; the median is kept",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="0 only: GPU runs are not scripted here (use adadiff upscale-many --gpus-per-worker)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/scaleout.json"))
    p.add_argument("--readme", type=Path, help="rewrite this README's scale-out figures")
    p.add_argument(
        "--render", type=Path, help="only render a saved JSON into --readme (nothing is run)"
    )
    args = p.parse_args()
    if args.render:
        if not args.readme:
            raise SystemExit("--render needs --readme")
        write_readme(json.loads(args.render.read_text()), args.render, args.readme)
        return
    if args.gpus_per_worker:
        raise SystemExit("GPU runs: use `adadiff upscale-many --gpus-per-worker` (not scripted)")
    if args.cpus_per_worker <= 0:
        raise SystemExit(f"--cpus-per-worker must be above 0, got {args.cpus_per_worker}")
    if args.readme:
        from benchmarks.report import check_readme

        try:
            check_readme(args.readme, start="<!-- scaleout:start -->", end="<!-- scaleout:end -->")
        except AdadiffError as exc:
            raise SystemExit(f"error: {exc}") from None
    import ray

    # "local": a new instance of its own, as the docstring says; plain ray.init() joins the cluster
    # of the last `ray start` here (another machine's share of CPUs) and hangs when it is gone
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    src = Path(tempfile.mkdtemp(prefix="adadiff-scaleout-in-"))
    try:
        sizes = make_folder(src, args.images)
        plan = [(1, True), (1, False)] + [(n, True) for n in range(2, args.max_workers + 1)]
        tries: dict[tuple[int, bool], list[dict[str, Any]]] = {key: [] for key in plan}
        for _ in range(args.repeats):  # interleaved, so drifting load hits every setting alike
            for workers, cross in plan:
                row = run_once(src, workers, cross, args.cpus_per_worker, args)
                tries[(workers, cross)].append(row)
                print(
                    f"workers {workers} {'cross-image ' if cross else 'image by image'}: "
                    f"{row['images_per_hour_steady']:8.0f} images/h steady, "
                    f"{row['images_per_hour_whole_job']:8.0f} whole job "
                    f"(start-up {row['startup_seconds']:.1f}s), mean batch {row['mean_batch']:.2f}",
                    flush=True,
                )
        runs = [median_run(tries[key]) for key in plan]
    finally:
        shutil.rmtree(src, ignore_errors=True)
        ray.shutdown()
    base = runs[0]["images_per_hour_steady"]
    summary = {
        "cross_vs_image_by_image_throughput": round(base / runs[1]["images_per_hour_steady"], 3),
        "cross_vs_image_by_image_mean_batch": round(
            runs[0]["mean_batch"] / runs[1]["mean_batch"], 3
        ),
        "speedup_by_workers": {
            str(r["workers"]): round(r["images_per_hour_steady"] / base, 3)
            for r in runs
            if r["cross_image"]
        },
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "command": "python -m benchmarks.scaleout "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine(),
        "weights": weights_of(args.model),
        "model": args.model,
        "cpus_per_worker": args.cpus_per_worker,
        "input_sizes": sizes,
        "runs": runs,
        "summary": summary,
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.readme:
        write_readme(data, args.out, args.readme)


def _per_worker(cpus: float) -> str:
    threads = worker_threads(cpus)
    cpu_text = "one CPU" if cpus == 1 else f"{cpus:g} CPUs"
    return f"{cpu_text} and {'one torch thread' if threads == 1 else f'{threads} torch threads'}"


def render(data: dict[str, Any], json_path: Path, readme: Path | None = None) -> str:
    from benchmarks.machine import machine_line
    from benchmarks.report import relative_link

    runs = data["runs"]
    sizes = data["input_sizes"]
    where = (
        relative_link(json_path.resolve(), readme.resolve())
        if readme is not None
        else json_path.as_posix()
    )
    # JSONs from before these were recorded come from the default run: tiny, one CPU per worker
    model = data.get("model", "tiny")
    lines = [
        f"Measured by `{data['command']}` ({where}): "
        f"{len(sizes)} photo crops of {min(w * h for w, h in sizes)} to "
        f"{max(w * h for w, h in sizes)} input pixels (1 to 4 tiles of the `{model}` model each, "
        f"{data.get('weights', 'weights not recorded')}), local Ray, "
        f"{_per_worker(float(data.get('cpus_per_worker', 1.0)))} per worker; each row is the "
        f"median of {runs[0].get('repeats', 1)} interleaved "
        "runs by steady throughput. Steady = after Ray start and model loading; whole job = "
        "including them.",
        "",
        f"Machine: {machine_line(data)}",
        "",
        "| workers | batching | images/hour (steady) | images/hour (whole job) | start-up s "
        "| mean batch | UNet calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workers']} | {'cross-image' if r['cross_image'] else 'image by image'} "
            f"| {r['images_per_hour_steady']:.0f} | {r['images_per_hour_whole_job']:.0f} "
            f"| {r['startup_seconds']:.1f} | {r['mean_batch']:.2f} | {r['unet_calls']} |"
        )
    s = data["summary"]
    batch_ratio = s["cross_vs_image_by_image_mean_batch"]
    speedups = ", ".join(f"{k} workers {v:.2f}x" for k, v in s["speedup_by_workers"].items())
    lines += [
        "",
        f"Cross-image against image by image on one worker: {batch_ratio:.2f}x "
        f"the mean batch, {s['cross_vs_image_by_image_throughput']:.2f}x the throughput. "
        f"Scaling (steady, against 1 worker): {speedups}.",
    ]
    return "\n".join(lines)


def write_readme(data: dict[str, Any], json_path: Path, readme: Path) -> None:
    from benchmarks.report import update_readme

    update_readme(
        readme,
        render(data, json_path, readme),
        start="<!-- scaleout:start -->",
        end="<!-- scaleout:end -->",
    )
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
