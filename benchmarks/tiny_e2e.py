"""End-to-end time of the tiny model: adaptive vs uniform-50, per input size (median of N).

python -m benchmarks.tiny_e2e --sizes 128 256 --repeats 3 --out runs/tiny_e2e.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from adadiff import Upscaler
from adadiff.argtypes import non_negative, positive
from adadiff.demo import photo
from adadiff.errors import AdadiffError
from benchmarks.machine import machine
from benchmarks.paths import check_out_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=positive, nargs="+", default=[128, 256])
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--backend", default="torch")
    p.add_argument("--engines", default=None)
    p.add_argument("--max-batch", type=positive, default=8)
    p.add_argument(
        "--threads",
        type=non_negative,
        default=0,
        help="CPU threads (0: every CPU the process may use)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/tiny_e2e.json"))
    args = p.parse_args(argv)
    try:  # before the runs: a bad --out or backend fails now in one line, not in a traceback
        check_out_file(args.out)
        # the backend sets torch's threads (and the passive OpenMP wait) from this
        up = Upscaler.from_pretrained(
            "tiny",
            backend=args.backend,
            engines=args.engines,
            max_batch=args.max_batch,
            threads=args.threads or None,
        )
    except AdadiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # One warm-up run loads every engine and allocator before anything is timed.
    up.upscale(photo("astronaut", 32).astype(np.float32) / 255.0, schedule="adaptive", seed=0)
    rows = []
    for size in args.sizes:
        img = photo("astronaut", size).astype(np.float32) / 255.0
        for schedule, interval in (("adaptive", None), ("uniform", 20)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                _, rep = up.upscale(img, schedule=schedule, interval=interval, seed=0)
                times.append(time.perf_counter() - start)
            row = {
                "size": size,
                "schedule": schedule,
                "interval": interval,
                "tiles": rep.tiles,
                "unet_evaluations": rep.unet_evaluations,
                "engine_calls": rep.engine_calls,
                "rounds": rep.rounds,
                "mean_batch": round(rep.mean_batch, 2),
                "seconds_median": round(statistics.median(times), 3),
                "seconds_all": [round(t, 3) for t in times],
                "stages_last": rep.seconds,
            }
            rows.append(row)
            print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "backend": args.backend,
                "max_batch": args.max_batch,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
