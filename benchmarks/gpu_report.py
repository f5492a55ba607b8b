"""The README's GPU check section, from ``gpu_check.json`` (``python -m benchmarks.gpu_check``).

``python -m benchmarks report DIR/gpu_check.json`` replaces the text between
``<!-- gpu:start -->`` and ``<!-- gpu:end -->``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_line
from benchmarks.paths import readme_arg

START = "<!-- gpu:start -->"
END = "<!-- gpu:end -->"


def render(result: dict[str, Any], json_path: Path, readme: Path) -> str:
    rel = os.path.relpath(json_path, readme.parent).replace(os.sep, "/")
    lines = [
        f"Generated from [`{rel}`]({rel}) by `python -m benchmarks report {rel}"
        f"{readme_arg(readme)}`; do not edit by hand.",
        "",
        f"**Machine:** {machine_line(result)}.",
        "",
    ]
    if result.get("dry_run"):
        return "\n".join([*lines, "A dry run (plan only): no GPU figures yet.", ""])
    lines += _parity(result.get("parity"))
    lines += _latency(result.get("unet_latency"))
    lines += _e2e(result.get("tiny_e2e"))
    lines += _shipped(result.get("shipped_photo"))
    for name in ("onnxruntime", "tensorrt"):
        lines += _optional(name, result.get(name))
    errors = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "Parts that failed in this run: " + "; ".join(errors) + "."]
    return "\n".join(lines) + "\n"


def _parity(data: dict[str, Any] | None) -> list[str]:
    if not data or "components" not in data:
        return []
    lines = [
        "Torch on the GPU against torch on the CPU (fp32), tiny's architecture with random "
        "weights, per component (max abs error; * outside the spec's tolerance):",
        "",
        "| precision | " + " | ".join(next(iter(data["components"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(data["components"].values()))),
    ]
    for precision, rows in data["components"].items():
        cells = [f"{r['max_abs']:.2e}{'' if r['within_tolerance'] else '*'}" for r in rows.values()]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    lines.append("")
    for precision, e2e in data.get("end_to_end", {}).items():
        same = "same steps per tile" if e2e["same_steps"] else "different steps"
        lines.append(
            f"- {precision} end to end: {same} ({e2e['steps_gpu']} vs {e2e['steps_reference']}),"
            f" PSNR {e2e['psnr_vs_cpu_db']} dB against the CPU image"
            + "".join(
                f"; tile {d['tile']} at t={d['t']} took {d['categories'][1]} instead of "
                f"{d['categories'][0]}, gains {d['distance_from_tau'][0]:.1e} from a threshold"
                for d in e2e["divergences"]
            )
        )
    return [*lines, f"- peak GPU memory {data.get('peak_mib')} MiB", ""]


def _latency(data: dict[str, Any] | None) -> list[str]:
    if not data or "rows" not in data:
        return []
    lines = [
        "sd21-base UNet (random init) per call on the torch backend:",
        "",
        "| precision | B | ms per call | ms per tile | TFLOP/s | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['ms']:.1f} | {r['ms_per_tile']:.1f} | "
            f"{r['tflops']:.1f} | {r['peak_mib']} |"
        )
    return [*lines, ""]


def _e2e(data: dict[str, Any] | None) -> list[str]:
    if not data or "regroup" not in data:
        return []
    r, t = data["regroup"], data["tile"]
    return [
        f"tiny upscale on the GPU ({r['tiles']} tiles): regrouped {r['seconds']:.2f} s in "
        f"{r['engine_calls']} UNet calls, tile by tile {t['seconds']:.2f} s in "
        f"{t['engine_calls']} calls ({data['speedup']}x); peak {data['peak_mib']} MiB.",
        "",
    ]


def _shipped(data: dict[str, Any] | None) -> list[str]:
    if not data or "rows" not in data:
        return []
    lines = [
        f"The shipped tiny on a hold-out photo ({data['photo']} in, {data['rows'][0]['tiles']} "
        f"tiles; CPU reference on {data['cpu_threads']} threads of the same machine):",
        "",
        "| device | precision | schedule | s per tile | UNet evals | PSNR vs CPU (dB) "
        "| same steps | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        psnr = r.get("psnr_vs_cpu_db", "reference")
        same = {True: "yes", False: "no"}.get(r.get("same_steps"), "")
        lines.append(
            f"| {r['device']} | {r['precision']} | {r['schedule']} | {r['seconds_per_tile']:.4f} | "
            f"{r['unet_evaluations']} | {psnr} | {same} | {r['peak_mib'] or ''} |"
        )
    return [*lines, ""]


def _optional(name: str, data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    if "skipped" in data:
        return [f"- {name}: skipped ({data['skipped']})"]
    if "components" in data:
        ok = all(v.get("within_10x_fp32_tolerance") for v in data["components"].values())
        worst = max(v["max_abs"] for v in data["components"].values())
        return [f"- {name}: parity with torch {'passed' if ok else 'FAILED'} (max abs {worst:.1e})"]
    return []
