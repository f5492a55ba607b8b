"""The README's Performance section, generated from a saved results JSON.

Only the text between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` is replaced; without
both markers, in that order and once each, nothing is written.

    python -m benchmarks report benchmarks/reference/cpu-quick/results.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adadiff.errors import AdadiffError, ConfigError
from benchmarks import gpu_report
from benchmarks.machine import SHIPPED_WEIGHTS, machine_line
from benchmarks.paths import readme_arg

START = "<!-- perf:start -->"
END = "<!-- perf:end -->"


class MarkerError(AdadiffError):
    """The README lacks the markers that delimit the generated section."""


def replace_section(text: str, section: str, *, start: str = START, end: str = END) -> str:
    """``text`` with everything between the markers replaced by ``section``."""
    starts, ends = text.count(start), text.count(end)
    if starts != 1 or ends != 1:
        raise MarkerError(
            f"expected one {start} and one {end} line, found {starts} and {ends}; add them "
            "around the generated section's body"
        )
    i, j = text.index(start), text.index(end)
    if j < i:
        raise MarkerError(f"{end} comes before {start}; put the start marker first")
    return text[: i + len(start)] + "\n" + section.strip("\n") + "\n" + text[j:]


def check_readme(readme: Path, *, start: str = START, end: str = END) -> None:
    """``MarkerError`` now, not after a run of many minutes, if ``readme`` cannot take the
    section (missing, unreadable, or without its markers)."""
    try:
        text = readme.read_text()
    except OSError as exc:
        raise MarkerError(f"--readme {readme}: {exc.strerror or exc}") from None
    replace_section(text, "", start=start, end=end)


def read_saved(path: Path, what: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The run saved in ``path`` for ``--render``, or ``ConfigError`` saying what to give;
    ``keys`` are those the section is made from (another benchmark's JSON lacks them)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(
            f"--render {path}: {exc.strerror or exc}; give the {what} that a run wrote"
        ) from None
    except ValueError as exc:  # not JSON, or not text
        raise ConfigError(
            f"--render {path} is not JSON ({exc}); give the {what} that a run wrote"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--render {path} is not a saved run; give the {what} that a run wrote")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(
            f"--render {path} is not a saved {what} (it has no {', '.join(missing)}); give the "
            f"{what} that a run wrote"
        )
    return data


def update_readme(readme: Path, section: str, *, start: str = START, end: str = END) -> None:
    text = readme.read_text()
    new = replace_section(text, section, start=start, end=end)
    if new != text:
        readme.write_text(new)


def ci(v: Sequence[float | None], digits: int = 3) -> str:
    """A mean and its 90% interval, as the README tables write them; an unavailable interval
    (one crop or block and one seed: nothing to resample) says so instead of a zero width."""
    mean, low, high = v
    if low is None or high is None:
        return f"{mean:.{digits}f} (interval unavailable)"
    return f"{mean:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _x(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render(
    result: dict[str, Any],
    json_path: Path,
    readme: Path,
    *,
    memory: tuple[dict[str, Any], Path] | None = None,
    load: tuple[dict[str, Any], Path] | None = None,
) -> str:
    """Markdown for the Performance section; plot links are relative to the README.

    ``memory``: a scaling run on large inputs (results JSON and its path), added as its own
    table; ``load``: a ``benchmarks load`` JSON, added as one paragraph."""
    s = result["settings"]
    summary = result.get("summary", {})
    rel = os.path.relpath(json_path, readme.parent).replace(os.sep, "/")
    command = f"python -m benchmarks report {rel}{readme_arg(readme)}" + "".join(
        f" --{flag} " + os.path.relpath(extra[1], readme.parent).replace(os.sep, "/")
        for flag, extra in (("memory", memory), ("load", load))
        if extra is not None
    )
    lines = [
        f"Generated from [`{rel}`]({rel}) (suite `{result['suite']}`) by "
        f"`{command}`; do not edit by hand.",
        "",
        f"**Machine:** {machine_line(result)}.  ",
        f"**Run:** model `{s['model']}`, device `{s['device']}`, backends "
        f"{', '.join(s['backends'])}, max batch {s['max_batch']}, median of "
        f"{result['repeats']} runs.",
        "",
    ]
    if s["model"] == "tiny" and result.get("weights") == SHIPPED_WEIGHTS:
        lines += [
            "`tiny` is the shipped model trained on a CPU (`adadiff/weights/tiny/MODEL_CARD.md`): "
            "a small network, so the figures show what the runtime costs and saves for its "
            "schedule decisions, not the paper's SD-2.1 timings or quality. The adaptive/uniform "
            "ratios are costs, not a verdict: on `tiny` adaptive is not better than 5 uniform "
            "steps or a fixed early exit of the same cost (Quality/compute front, "
            "docs/adaptive.md), and `tiny` runs 5 uniform steps by default.",
            "",
        ]
    elif s["model"] == "tiny":
        lines += [
            "`tiny` is seeded random init: its MMLE is untrained, so the adaptive schedule's "
            "decisions (and its step count) are not those of a trained model. The figures show "
            "what the runtime costs and saves for a given schedule, not the paper's quality.",
            "",
        ]
    lines += _headline(summary)
    lines += _schedules(result.get("schedules"))
    lines += _regrouping(result.get("regrouping"))
    lines += _backends(result.get("backends"))
    lines += _scaling(result.get("scaling"))
    lines += _fullsize(result.get("fullsize"))
    if memory is not None:
        lines += _memory(memory[0], relative_link(memory[1], readme))
    if load is not None:
        lines += _load(load[0], relative_link(load[1], readme))
    plots_dir = json_path.parent
    for name in result.get("plots", []):
        link = os.path.relpath(plots_dir / name, readme.parent).replace(os.sep, "/")
        lines.append(f"![{Path(name).stem}]({link})")
    errors = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "Sections that failed in this run: " + "; ".join(errors) + "."]
    return "\n".join(lines) + "\n"


def _headline(summary: dict[str, Any]) -> list[str]:
    rows = []
    sched = summary.get("schedules", {})
    ref = sched.get("reference", "reference")
    for key, name in (
        ("unet_evaluations", "UNet evaluations"),
        ("flops", "FLOPs (all components)"),
        ("seconds", "wall time"),
    ):
        value = sched.get("adaptive", {}).get(key)
        if value is not None:
            rows.append(f"| adaptive / {ref}: {name} | {_x(value)} |")
    reg = summary.get("regrouping", {})
    if reg.get("tile/regroup") is not None:
        rows.append(f"| tile-by-tile / regrouped wall time | {_x(reg['tile/regroup'])} |")
    if reg.get("timestep/regroup") is not None:
        rows.append(
            f"| grouped by timestep / regrouped wall time | {_x(reg['timestep/regroup'])} |"
        )
    for label, share in summary.get("host_share", {}).items():
        rows.append(f"| host overhead share of an adaptive upscale ({label}) | {_pct(share)} |")
    for item in summary.get("backends", []):
        rows.append(f"| {item['pair']}: {item['what']} | {_x(item['ratio'])} |")
    scaling = summary.get("scaling", {})
    if scaling.get("loglog_slope") is not None:
        rows.append(
            f"| scaling: log-log slope of time vs tiles (1 = linear) | "
            f"{_x(scaling['loglog_slope'])} |"
        )
    if not rows:
        return []
    return ["| headline (ratios of the recorded numbers) | |", "|---|---|", *rows, ""]


def _schedules(data: dict[str, Any] | None) -> list[str]:
    if not data or "error" in data:
        return []
    totals = data["totals"]
    photos = ", ".join(f"{k} {v['size'][0]}x{v['size'][1]}" for k, v in data["photos"].items())
    out = [
        f"Schedules, summed over {photos} (output difference to {data['reference']}, same seed):",
        "",
        "| schedule | UNet evals | calls | GFLOPs | MMLE+PFJ FLOPs | wall s | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in data["schedules"]:
        t = totals.get(spec["label"])
        if not t:
            continue
        out.append(
            f"| {spec['label']} | {t['unet_evaluations']} | {t['engine_calls']} | "
            f"{t['flops']['total'] / 1e9:.1f} | {_pct(t['scoring_flops_share'])} | "
            f"{t['seconds']:.2f} | {_x(t.get('psnr_mean'))} | {_x(t.get('ssim_mean'), 3)} |"
        )
    return [*out, ""]


def _regrouping(data: dict[str, Any] | None) -> list[str]:
    if not data or "error" in data:
        return []
    rows = data["rows"]
    out = [
        f"Regrouping: one adaptive upscale of {data['photo']} "
        f"({data['input_size'][0]}x{data['input_size'][1]}, {rows[0]['tiles']} tiles), "
        f"max batch {data['max_batch']}:",
        "",
        "| grouping | calls | mean batch | wall s | ms per UNet evaluation |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['grouping']} | {r['engine_calls']} | {r['mean_batch']:.2f} | "
            f"{r['seconds']['median']:.2f} | {1e3 * r['seconds_per_evaluation']:.1f} |"
        )
    return [*out, ""]


def _backends(data: dict[str, Any] | None) -> list[str]:
    if not data or "error" in data:
        return []
    batches = data["batches"]
    lo, hi = str(batches[0]), str(batches[-1])
    out = [
        f"Backends: engine latency per tile (ms) at batch {lo} and {hi}, and a whole adaptive "
        f"upscale of {data['photo']}:",
        "",
        f"| variant | UNet B={lo} | UNet B={hi} | VAE dec B={lo} | MMLE+PFJ B={hi} | "
        "upscale s | host share |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, v in data["variants"].items():
        if "error" in v:
            out.append(f"| {label} | failed: {v['error'].splitlines()[0][:80]} | | | | | |")
            continue
        lat = v["latency"]

        def ms(comp: str, b: str, lat: dict = lat) -> float:
            return 1e3 * lat[comp][b]["per_item"]

        out.append(
            f"| {label} | {ms('unet', lo):.1f} | {ms('unet', hi):.1f} | "
            f"{ms('vae_decoder', lo):.1f} | {ms('mmle', hi) + ms('pfj', hi):.2f} | "
            f"{v['upscale']['wall_median']:.2f} | {_pct(v['upscale']['host_share_median'])} |"
        )
    return [*out, ""]


def _scaling(data: dict[str, Any] | None) -> list[str]:
    if not data or "error" in data:
        return []
    head = (
        f"Scaling ({data['schedule']}, {data['backend']}; peak memory of a fresh process per size):"
    )
    return _size_table(head, data["rows"], with_output=False)


def _size_table(head: str, rows: list[dict[str, Any]], *, with_output: bool) -> list[str]:
    """One row per input size: tiles, wall time, time per tile, peak RSS (and the output size)."""
    columns = ["input", *(["output"] if with_output else []), "tiles", "wall s", "s per tile"]
    columns.append("peak RSS MB")
    out = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | failed |" + " |" * (len(columns) - 2))
            continue
        cells = ["{}x{}".format(*r["input_size"])]
        if with_output:
            cells.append("{}x{}".format(*r["output_size"]))
        digits = 1 if with_output else 2
        cells += [
            str(r["tiles"]),
            f"{r['seconds']['median']:.{digits}f}",
            f"{r['seconds_per_tile']:.3f}",
            f"{r['memory']['peak_rss_mb']:.0f}" if with_output else f"{r['memory']['peak_rss_mb']}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def relative_link(path: Path, readme: Path) -> str:
    """``path`` as a link from ``readme``'s folder, with forward slashes."""
    return os.path.relpath(path, readme.parent).replace(os.sep, "/")


def _memory(result: dict[str, Any], rel: str) -> list[str]:
    data = result.get("scaling")
    if not isinstance(data, dict) or "error" in data:
        return []
    head = (
        f"Large photos, from [`{rel}`]({rel}) (`python -m benchmarks "
        f"{' '.join(result.get('argv', []))}`; {machine_line(result)}): what `adadiff upscale` "
        f"does with a file (read PNG, upscale into a uint8 canvas, write PNG), {data['schedule']} "
        "(memory does not depend on the steps), peak resident memory of a fresh process per "
        "size, model included:"
    )
    return _size_table(head, data["rows"], with_output=True)


def _busy(data: dict[str, Any]) -> str:
    n = data["busy_processes"]
    return f"{n} busy process" if n == 1 else f"{n} busy processes"


def _per_cpu(data: dict[str, Any]) -> str:
    cores = data.get("machine", {}).get("cores")
    return " (one per CPU)" if cores == data["busy_processes"] else ""


def _load(data: dict[str, Any], rel: str) -> list[str]:
    return [
        f"Busy machine, from [`{rel}`]({rel}) (`python -m benchmarks "
        f"{' '.join(data.get('argv', [])[1:])}`; {machine_line(data)}): the demo's upscale took "
        f"{data['idle_upscale_s']:.1f} s alone and {data['loaded_upscale_s']:.1f} s with "
        f"{_busy(data)} spinning{_per_cpu(data)}, "
        f"{data['ratio']:.2f}x (target at most {data['target_ratio']}x; a fair share of the "
        f"cores alone gives about 2x); the load average before the run was "
        f"{data['loadavg_before'][0]}.",
        "",
    ]


def _fullsize(data: dict[str, Any] | None) -> list[str]:
    if not data or "error" in data:
        return []
    out = []
    lat = data.get("unet_latency", {}).get("latency")
    if lat:
        out += [
            "sd21-base (random init) UNet per call on this CPU:",
            "",
            "| batch | torch s | onnxruntime s |",
            "|---|---|---|",
        ]
        out += [f"| {b} | {r['torch_seconds']} | {r['ort_seconds']} |" for b, r in lat.items()]
        out.append("")
    run = data.get("adaptive", {})
    if "tiles" in run:
        out += [
            f"sd21-base adaptive upscale of a {run['input_size'][0]}x{run['input_size'][1]} "
            f"photo: {run['tiles']} tiles, {run['unet_evaluations']} UNet evaluations, "
            f"{run['seconds']['median']:.1f} s.",
            "",
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks report",
        description="write the README Performance section from a results JSON, or the GPU check "
        "section from a gpu_check.json",
    )
    p.add_argument(
        "results", type=Path, help="a suite's results.json, or a gpu_check.json (GPU section)"
    )
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--print", action="store_true", help="print the section instead of writing")
    p.add_argument(
        "--memory", type=Path, help="results.json of a scaling run on large inputs, added"
    )
    p.add_argument("--load", type=Path, help="JSON written by `python -m benchmarks load`, added")
    p.add_argument(
        "--allow-dry-run",
        action="store_true",
        help="write the GPU check section from a dry run's gpu_check.dry.json (no figures)",
    )
    args = p.parse_args(argv)
    loaded: dict[str, tuple[dict[str, Any], Path]] = {}
    for key, path in (("main", args.results), ("memory", args.memory), ("load", args.load)):
        if path is None:
            continue
        try:
            loaded[key] = (json.loads(path.read_text()), path)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    result = loaded["main"][0]
    markers = {"start": START, "end": END}
    what = "Performance"
    if isinstance(result, dict) and result.get("kind") == "gpu_check":
        if result.get("dry_run") and not (args.allow_dry_run or args.print):
            # a dry run has no figures: it would replace a real run's in the README
            print(
                f"error: {args.results} is a dry run (planned without a GPU, no figures) and "
                f"would replace the GPU check figures in {args.readme}; render a real run's "
                "gpu_check.json, or pass --allow-dry-run to write it anyway",
                file=sys.stderr,
            )
            return 2
        section = gpu_report.render(result, args.results, args.readme)
        markers = {"start": gpu_report.START, "end": gpu_report.END}
        what = "GPU check"
    elif not isinstance(result, dict) or "settings" not in result or "suite" not in result:
        print(
            f"error: {args.results} is not a suite's results.json nor a gpu_check.json (a front "
            "or quality JSON renders with `python -m benchmarks.front --render FILE --readme "
            "README.md`, or benchmarks.quality's)",
            file=sys.stderr,
        )
        return 2
    else:
        section = render(
            result, args.results, args.readme, memory=loaded.get("memory"), load=loaded.get("load")
        )
    if args.print:
        print(section)
        return 0
    try:
        update_readme(args.readme, section, **markers)
    except (OSError, MarkerError) as exc:
        print(f"error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    print(f"updated the {what} section of {args.readme} from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
