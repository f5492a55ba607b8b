"""The demo's upscale idle and under load: does adadiff stay fast on a busy machine?

Runs ``adadiff demo`` (astronaut, 128 px, the model's default schedule unless --schedule, the
CLI's default threads unless --threads)
in a fresh process, first on its own, then while one busy process per usable CPU spins (this
script starts and stops them), alternating so slow drifts of the machine hit both alike. The
upscale's time comes from the demo's report.json (``seconds.total``: encode, denoise, decode);
the whole command's wall time (start-up and model load too) is recorded beside it. Issue 19's
target: under load at most 2.5x idle (a fair share of the cores alone gives about 2x).

    python -m benchmarks load --out benchmarks/reference/load-cpu.json     (or: adadiff bench load)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adadiff.argtypes import DefaultsFormatter, positive
from adadiff.config import SCHEDULES
from adadiff.errors import OutputPathError
from benchmarks.paths import check_out_file
from benchmarks.suites import ROOT, child_env

TARGET_RATIO = 2.5
# a busy core that stops once its parent is gone (killed before it could stop the spinners)
SPIN = (
    "import os, sys\n"
    "while os.getppid() == int(sys.argv[1]):\n"
    "    for _ in range(1_000_000):\n"
    "        pass\n"
)


def run_demo(work: Path, extra: list[str]) -> dict[str, float]:
    """One ``adadiff demo`` in a fresh process: its upscale seconds and whole wall seconds."""
    out = work / f"demo-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "adadiff.cli", "demo", "-o", str(out), "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"adadiff demo failed (exit {done.returncode}): {done.stderr.strip()}")
    report = json.loads((out / "report.json").read_text())
    return {"upscale_s": float(report["seconds"]["total"]), "command_s": round(wall, 3)}


class Spinners:
    """``count`` busy Python processes (one core each) while the block runs."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Spinners:
        try:
            for _ in range(self.count):
                self.procs.append(subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())]))
            time.sleep(1.0)  # let the scheduler see them before the measurement starts
        except BaseException:  # a SIGTERM or Ctrl-C here: __exit__ would not run
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def measure(repeats: int, busy: int, extra: list[str]) -> dict[str, Any]:
    from adadiff.threads import usable_cpus

    runs: dict[str, list[dict[str, float]]] = {"idle": [], "loaded": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="adadiff-load-") as tmp:
        work = Path(tmp)
        run_demo(work, extra)  # warm the file cache and any first-run work
        for _ in range(repeats):
            runs["idle"].append(run_demo(work, extra))
            with Spinners(busy):
                runs["loaded"].append(run_demo(work, extra))
    idle = statistics.median(r["upscale_s"] for r in runs["idle"])
    loaded = statistics.median(r["upscale_s"] for r in runs["loaded"])
    return {
        "what": "adadiff demo (astronaut 128 px): upscale seconds from report.json",
        "extra_args": extra,
        "usable_cpus": usable_cpus(),
        "busy_processes": busy,
        "repeats": repeats,
        "loadavg_before": [round(x, 2) for x in load_before],
        "runs": runs,
        "idle_upscale_s": round(idle, 3),
        "loaded_upscale_s": round(loaded, 3),
        "ratio": round(loaded / idle, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": loaded / idle <= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import machine

    p = argparse.ArgumentParser(
        prog="adadiff bench load",
        description="time the demo's upscale idle and with one busy process per CPU",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("bench-load.json"), help="JSON to write")
    p.add_argument("--repeats", type=positive, default=3, help="idle/loaded pairs (median)")
    p.add_argument(
        "--busy", type=positive, default=None, help="busy processes (default: one per CPU)"
    )
    p.add_argument("--threads", type=positive, default=None, help="pass --threads to the demo")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="pass --schedule to the demo (default: the model's own)",
    )
    args = p.parse_args(argv)
    from adadiff.threads import default_threads, usable_cpus

    try:  # before minutes of runs: an --out that cannot be written fails now, in one line
        check_out_file(args.out)
    except OutputPathError as exc:
        p.error(str(exc))

    extra = [] if args.threads is None else ["--threads", str(args.threads)]
    if args.schedule is not None:
        extra += ["--schedule", args.schedule]
    result = measure(args.repeats, args.busy or usable_cpus(), extra)
    result["machine"] = machine()
    # torch ran in the demo processes, not here: record the threads they used
    result["machine"]["torch_threads"] = args.threads or default_threads()
    result["argv"] = ["benchmarks", "load", *(sys.argv[1:] if argv is None else argv)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"idle {result['idle_upscale_s']:.2f}s, under load ({result['busy_processes']} busy "
        f"processes) {result['loaded_upscale_s']:.2f}s: {result['ratio']:.2f}x (target <= "
        f"{TARGET_RATIO}x); load average before {result['loadavg_before'][0]}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
