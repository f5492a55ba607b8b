"""PNG plots of a results JSON (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMPONENT_ORDER = ("unet", "mmle", "pfj", "vae_encoder", "vae_decoder")
DPI = 90


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(result: dict[str, Any], out: Path) -> list[str]:
    """Every plot the result has data for; returns the file names written into ``out``."""
    writers = {
        "schedules": schedules,
        "regrouping": regrouping,
        "backends": backends,
        "scaling": scaling,
    }
    written = []
    for section, writer in writers.items():
        data = result.get(section)
        if not data or "error" in data:
            continue
        path = out / f"{section}.png"
        if writer(data, path, _title(result)):
            written.append(path.name)
    return written


def _title(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    s = result.get("settings", {})
    return f"{s.get('model', '?')} on {s.get('device', '?')} ({where})"


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return True


def schedules(data: dict[str, Any], path: Path, title: str) -> bool:
    plt = _pyplot()
    totals = data["totals"]
    labels = [s["label"] for s in data["schedules"] if s["label"] in totals]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    ax = axes[0]
    ax.bar(labels, [totals[k]["unet_evaluations"] for k in labels], color="tab:blue")
    ax.set_title("UNet evaluations")
    ax = axes[1]
    bottom = [0.0] * len(labels)
    for comp in COMPONENT_ORDER:
        vals = [totals[k]["flops"].get(comp, 0) / 1e9 for k in labels]
        if any(vals):
            ax.bar(labels, vals, bottom=bottom, label=comp)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_title("GFLOPs per component")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(labels, [totals[k]["seconds"] for k in labels], color="tab:green")
    ax.set_title("wall time, s (sum of medians)")
    ref = data["reference"]
    heights = (
        [totals[k]["unet_evaluations"] for k in labels],
        bottom,
        [totals[k]["seconds"] for k in labels],
    )
    for ax, key, tops in zip(axes, ("unet_evaluations", "flops", "seconds"), heights, strict=True):
        for i, k in enumerate(labels):
            ratio = totals[k].get("vs_reference", {}).get(key)
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (i, tops[i]), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"schedules against {ref} ({len(data['photos'])} photos): {title}", fontsize=9)
    return _save(fig, path)


def regrouping(data: dict[str, Any], path: Path, title: str) -> bool:
    plt = _pyplot()
    rows = data["rows"]
    names = [r["grouping"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [r["seconds"]["median"] for r in rows], color="tab:green")
    axes[0].set_title("wall time, s")
    axes[1].bar(names, [r["engine_calls"] for r in rows], color="tab:orange")
    axes[1].set_title("UNet calls")
    for i, r in enumerate(rows):
        axes[1].annotate(
            f"B={r['mean_batch']:.1f}", (i, r["engine_calls"]), ha="center", va="bottom", fontsize=8
        )
    axes[2].bar(names, [1e3 * r["seconds_per_evaluation"] for r in rows], color="tab:blue")
    axes[2].set_title("ms per UNet evaluation (wall)")
    fig.suptitle(
        f"adaptive, {data['photo']} at {data['long_side']} px, {rows[0]['tiles']} tiles: {title}",
        fontsize=9,
    )
    return _save(fig, path)


def backends(data: dict[str, Any], path: Path, title: str) -> bool:
    plt = _pyplot()
    ok = {k: v for k, v in data["variants"].items() if "error" not in v}
    if not ok:
        return False
    fig, axes = plt.subplots(1, len(COMPONENT_ORDER), figsize=(15, 3.4))
    for ax, comp in zip(axes, COMPONENT_ORDER, strict=True):
        for label, v in ok.items():
            per_batch = v["latency"].get(comp, {})
            batches = sorted(int(b) for b in per_batch)
            ax.plot(
                batches,
                [1e3 * per_batch[str(b)]["per_item"] for b in batches],
                marker="o",
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(comp, fontsize=9)
        ax.set_xlabel("batch")
    axes[0].set_ylabel("ms per tile")
    axes[0].legend(fontsize=7)
    shares = ", ".join(f"{k} {100 * v['upscale']['host_share_median']:.0f}%" for k, v in ok.items())
    fig.suptitle(f"latency per tile vs batch; host overhead share: {shares}; {title}", fontsize=9)
    return _save(fig, path)


def scaling(data: dict[str, Any], path: Path, title: str) -> bool:
    plt = _pyplot()
    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        return False
    tiles = [r["tiles"] for r in rows]
    secs = [r["seconds"]["median"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(tiles, secs, marker="o", label="measured")
    per_tile = secs[0] / tiles[0]
    ax.plot(tiles, [per_tile * t for t in tiles], "--", color="grey", label="linear in tiles")
    for r in rows:
        ax.annotate(f"{r['size']}px", (r["tiles"], r["seconds"]["median"]), fontsize=7)
    ax.set_xlabel("tiles")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title(data["schedule"], fontsize=9)
    ax = axes[1]
    mem = [r["memory"].get("peak_rss_mb") for r in rows]
    ax.plot(tiles, mem, marker="o", label="peak RSS")
    cuda = [r["memory"].get("cuda_peak_allocated_mb") for r in rows]
    if any(v is not None for v in cuda):
        ax.plot(tiles, cuda, marker="s", label="CUDA peak, torch allocator")
    device = [r["memory"].get("cuda_device_used_after_mb") for r in rows]
    if any(v is not None for v in device):
        ax.plot(tiles, device, marker="^", label="CUDA device used after (all allocations)")
    ax.set_xlabel("tiles")
    ax.set_ylabel("MB")
    ax.legend(fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set_title("peak memory (fresh process per size)", fontsize=9)
    fig.suptitle(f"scaling: {title}", fontsize=9)
    return _save(fig, path)
