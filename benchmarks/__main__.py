"""``python -m benchmarks quick|full [options]`` (also ``adadiff bench``),
``python -m benchmarks load`` (idle against busy machine),
``python -m benchmarks front`` (quality against UNet evaluations, ``benchmarks.front``),
``python -m benchmarks quality`` (whole photos against bicubic, and a gallery:
``benchmarks.quality``) and ``python -m benchmarks report RESULTS.json``.

A suite writes ``OUT/results.json`` (machine, settings, every measured row and the summary
ratios computed from those rows) and one PNG per section into ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from adadiff.argtypes import noise_seed, positive, positive_list
from adadiff.artifacts import ExportManifest
from adadiff.device_check import check_device
from adadiff.errors import AdadiffError, ConfigError
from adadiff.presets import model_config
from benchmarks.paths import check_out_folder
from benchmarks.suites import SECTIONS, SUITES, Context, Settings, Suite

RESULTS = "results.json"
FAILED_RESULTS = "results.failed.json"  # a run with a failed section


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adadiff bench",
        description="adadiff benchmarks: schedules, regrouping, backends, scaling, full size",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, suite in SUITES.items():
        s = sub.add_parser(name, help=f"the {name} suite: {', '.join(suite.sections)}")
        s.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
        s.add_argument(
            "--backend",
            default="torch,onnxruntime",
            help="comma list of torch, onnxruntime, tensorrt; the first runs sections 1, 2, 4",
        )
        s.add_argument("--model", default="tiny", help="tiny, sd21-base or a model folder")
        s.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
        s.add_argument("--out", type=Path, default=Path(f"bench-{name}"), help="output folder")
        s.add_argument("--repeats", type=positive, default=None, help=f"default {suite.repeats}")
        s.add_argument("--max-batch", type=positive, default=16)
        s.add_argument(
            "--threads",
            type=positive,
            default=None,
            help="intra-op threads of torch and ONNX Runtime",
        )
        s.add_argument("--seed", type=noise_seed, default=0)
        s.add_argument("--engines", type=Path, default=None, help="reuse an ONNX export folder")
        s.add_argument(
            "--sections", default=None, help=f"comma subset of {','.join(suite.sections)}"
        )
        s.add_argument(
            "--photo-size", type=positive, default=None, help="long side of the schedule photos"
        )
        s.add_argument(
            "--sizes",
            type=positive_list,
            default=None,
            help="comma list of scaling input sizes in pixels",
        )
        s.add_argument(
            "--scaling-interval",
            type=positive,
            default=None,
            help=f"uniform interval of the scaling runs (default {suite.scaling_interval}; "
            "200 = 5 steps, enough for memory, which does not depend on steps)",
        )
        s.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
        s.add_argument("--keep-work", action="store_true", help="keep exports and scratch")
    sub.add_parser(
        "load",
        help="the demo's upscale idle and with one busy process per CPU (see load --help)",
        add_help=False,
    )
    sub.add_parser(
        "front",
        help="quality against UNet evaluations per tile on hold-out crops (see front --help)",
        add_help=False,
    )
    sub.add_parser(
        "quality",
        help="a model against bicubic on whole photos, two degradations, and a gallery "
        "(see quality --help)",
        add_help=False,
    )
    r = sub.add_parser(
        "report",
        help="write README's Performance section from a suite's results.json, or its GPU check "
        "section from a gpu_check.json",
    )
    r.add_argument("results", type=Path)
    r.add_argument("--readme", type=Path, default=Path("README.md"))
    r.add_argument("--print", action="store_true")
    r.add_argument("--memory", type=Path, help="a scaling run on large inputs to add")
    r.add_argument("--load", type=Path, help="a `load` run's JSON to add")
    r.add_argument(
        "--allow-dry-run", action="store_true", help="render a GPU check dry run (no figures)"
    )
    return p


def _suite(args: argparse.Namespace) -> Suite:
    suite = SUITES[args.command]
    changes: dict[str, Any] = {}
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.sections is not None:
        changes["sections"] = tuple(x.strip() for x in args.sections.split(",") if x.strip())
        if not changes["sections"]:
            # a run of nothing would still replace OUT/results.json with an empty one
            raise ConfigError(
                f"--sections {args.sections!r} names no section; give some of "
                f"{','.join(suite.sections)}"
            )
    if args.photo_size:
        changes["photo_size"] = changes["regroup_size"] = args.photo_size
    if args.sizes:
        changes["scaling_sizes"] = args.sizes
    if args.scaling_interval:
        changes["scaling_interval"] = args.scaling_interval
    return replace(suite, **changes)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        device=args.device,
        backends=tuple(x.strip() for x in args.backend.split(",") if x.strip()),
        model=args.model,
        precision=args.precision,
        max_batch=args.max_batch,
        threads=args.threads,
        seed=args.seed,
        engines=args.engines,
        keep_work=args.keep_work,
    )


def run_suite(
    suite: Suite,
    settings: Settings,
    out: Path,
    work: Path | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Run every section of ``suite``; write results.json and the plots into ``out``.

    A section that fails is recorded with its error and the others still run.
    """
    from benchmarks import backends, plots, regrouping, scaling, schedules
    from benchmarks.fullsize import run_fullsize
    from benchmarks.machine import machine, timed_section, weights_of

    out.mkdir(parents=True, exist_ok=True)
    runners = {
        "schedules": schedules.run,
        "regrouping": regrouping.run,
        "backends": backends.run,
        "scaling": scaling.run,
        "fullsize": run_fullsize,
    }
    ctx = Context.create(suite, settings, work)
    result: dict[str, Any] = {
        "suite": suite.name,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "settings": settings.to_dict(),
        "repeats": suite.repeats,
        "sections": list(suite.sections),
        "variants": [asdict(v) for v in ctx.variants],
        "seconds": {},
    }
    start = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in suite.sections:
                continue
            timed_section(name, lambda name=name: runners[name](ctx), result)
    finally:
        ctx.close()
    result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    # After the runs: torch's thread count and the libraries actually imported are known.
    result["machine"] = machine(settings.device)
    result["weights"] = weights_of(result["settings"]["model"])
    result["summary"] = summarize(result)
    result["failed"] = failed_sections(result, suite.sections)
    if result["failed"]:
        # the folder's results.json and plots (a reference run, say) stay as they were
        result["plots"] = []
        (out / FAILED_RESULTS).write_text(json.dumps(result, indent=1) + "\n")
        return result
    try:
        result["plots"] = plots.write_all(result, out)
    except Exception as exc:  # a broken plot must not lose the measurements
        result["plots"] = []
        result["plots_error"] = f"{type(exc).__name__}: {exc}"
    (out / RESULTS).write_text(json.dumps(result, indent=1) + "\n")
    (out / FAILED_RESULTS).unlink(missing_ok=True)
    return result


def failed_sections(result: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """Sections with an error, and those whose every part failed: each backends variant, each
    scaling size (its child process killed, say), both fullsize runs."""
    failed = []
    for name in sections:
        data = result.get(name)
        if not isinstance(data, dict) or "error" in data:
            failed.append(name)
            continue
        parts: list[Any] = {
            "backends": list((data.get("variants") or {}).values()),
            "scaling": data.get("rows") or [],
            "fullsize": [data.get("unet_latency"), data.get("adaptive")],
        }.get(name, [{}])
        if all(not isinstance(p, dict) or "error" in p for p in parts):
            failed.append(name)
    return failed


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The note's figures, each a ratio of numbers recorded elsewhere in ``result``."""
    from benchmarks.backends import compare
    from benchmarks.regrouping import speedups
    from benchmarks.scaling import fit
    from benchmarks.schedules import totals

    summary: dict[str, Any] = {}
    sched = _ok(result, "schedules")
    if sched:
        t = totals(sched)
        summary["schedules"] = {"reference": sched["reference"]} | {
            label: v["vs_reference"] for label, v in t.items() if "vs_reference" in v
        }
        if "adaptive" in t:
            summary["schedules"]["adaptive_scoring_flops_share"] = t["adaptive"][
                "scoring_flops_share"
            ]
    reg = _ok(result, "regrouping")
    if reg:
        summary["regrouping"] = speedups(reg["rows"])
    back = _ok(result, "backends")
    if back:
        variants = back["variants"]
        summary["host_share"] = {
            k: v["upscale"]["host_share_median"] for k, v in variants.items() if "error" not in v
        }
        comparison = compare(variants)
        base = comparison.get("baseline")
        items = []
        for pair, c in comparison.items():
            if pair == "baseline":
                continue
            unet = c["latency"].get("unet", {})
            for b in (min(unet, key=int, default=None), max(unet, key=int, default=None)):
                if b is not None:
                    items.append({"pair": pair, "what": f"UNet latency B={b}", "ratio": unet[b]})
            items.append(
                {"pair": pair, "what": "adaptive upscale wall", "ratio": c["upscale_wall"]}
            )
        summary["backends"] = items
        summary["backends_baseline"] = base
    scal = _ok(result, "scaling")
    if scal:
        summary["scaling"] = fit(scal["rows"])
    return summary


def _ok(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    data = result.get(name)
    return data if isinstance(data, dict) and "error" not in data else None


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM ends the run as Ctrl-C does: `with` blocks and subprocess.run stop the children
    # (load's busy loops, a demo, a suite's worker) instead of leaving them to run on
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("adadiff bench: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        from benchmarks import load

        return load.main(argv[1:])
    if argv[:1] == ["front"]:
        from benchmarks import front

        return front.main(argv[1:])
    if argv[:1] == ["quality"]:
        from benchmarks import quality

        return quality.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "report":
        from benchmarks import report

        rest = [str(args.results), "--readme", str(args.readme)]
        for flag, path in (("--memory", args.memory), ("--load", args.load)):
            if path is not None:
                rest += [flag, str(path)]
        if args.allow_dry_run:
            rest.append("--allow-dry-run")
        return report.main([*rest, "--print"] if args.print else rest)
    try:
        suite, settings = _suite(args), _settings(args)
        model_config(settings.model)  # a model that cannot load fails every section
        if settings.engines is not None:
            # else a wrong folder failed only the ONNX variants, after the torch sections had
            # run, and the run passed without them
            ExportManifest.load(settings.engines)
        check_out_folder(args.out)
        if args.work is not None:
            check_out_folder(args.work, "--work")
        # a GPU the first backend lacks fails every section; a later backend without one
        # fails only its own variant, as one failing backend must not hide the others' figures
        check_device(settings.backends[0], settings.device)
    except (AdadiffError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"suite {suite.name}: {', '.join(suite.sections)} on {settings.device} with "
        f"{', '.join(settings.backends)}, model {settings.model}, {suite.repeats} repeats",
        flush=True,
    )
    result = run_suite(suite, settings, args.out, args.work, argv)
    print(json.dumps(result["summary"], indent=1))
    if result["failed"]:
        print(
            f"sections that failed: {', '.join(result['failed'])}; the run is in "
            f"{args.out / FAILED_RESULTS} and {args.out / RESULTS} was left as it was",
            file=sys.stderr,
        )
        return 1
    print(
        f"wrote {args.out / RESULTS} and {len(result['plots'])} plots in "
        f"{result['seconds']['total']}s"
    )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
