"""Developer check (not run in CI): every name tests/fake_tensorrt.py offers exists in the real
TensorRT Python bindings.

    python tools/check_trt_double.py                 # pip-downloads tensorrt-cu12-bindings
    python tools/check_trt_double.py --wheel FILE    # or reads a wheel you have

The bindings module cannot be imported without TensorRT's libraries (libnvinfer, about 1 GB), so
the check reads the compiled module's string table: pybind11 registers every class, method,
property and enum value by a C string. The linker may store a name as the tail of a longer
string (``Logger`` inside ``ILogger``), so a tail match counts too; ``__version__`` is looked
up in the package's ``__init__.py``.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The double's test harness, not part of the tensorrt API it imitates.
HARNESS = {"STATE", "FakeCuda", "FakeStream", "install"}


def offered_names() -> dict[str, str]:
    """name -> where the double offers it (module or Class.member)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_tensorrt as fake

    names: dict[str, str] = {"__version__": "module"}
    for name, value in vars(fake).items():
        if name.startswith("_") or name in HARNESS:
            continue
        if inspect.ismodule(value) or getattr(value, "__module__", fake.__name__) != fake.__name__:
            continue  # imports (json, np, Any, dataclass, ...)
        names.setdefault(name, "module")
        if isinstance(value, enum.EnumType):
            for member in value.__members__:
                names.setdefault(member, name)
        elif inspect.isclass(value):
            for member in vars(value):
                if not member.startswith("_"):
                    names.setdefault(member, name)
            init = vars(value).get("__init__")
            if init is not None:
                # attributes the double sets in __init__ without an underscore
                for member in re.findall(r"self\.([a-z]\w*)\s*[:=]", inspect.getsource(init)):
                    names.setdefault(member, name)
    return names


def wheel_path(given: Path | None, work: Path) -> Path:
    if given is not None:
        return given
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "tensorrt-cu12-bindings",
            "--no-deps",
            "-q",
            "-d",
            str(work),
        ],
        check=True,
    )
    return next(work.glob("tensorrt_cu12_bindings-*.whl"))


def binding_strings(wheel: Path) -> tuple[set[str], str, str]:
    with zipfile.ZipFile(wheel) as zf:
        so = next(n for n in zf.namelist() if re.search(r"/tensorrt[^/]*\.so$", n))
        init = next(n for n in zf.namelist() if n.endswith("tensorrt_bindings/__init__.py"))
        blob = zf.read(so)
        init_text = zf.read(init).decode()
    strings = {m.decode() for m in re.findall(rb"[\x20-\x7e]{2,}", blob)}
    version = re.search(r'__version__ = "([^"]+)"', init_text)
    return strings, init_text, version.group(1) if version else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, help="a tensorrt-cu12-bindings wheel (default: download)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        strings, init_text, version = binding_strings(wheel_path(args.wheel, Path(tmp)))
    tails = tuple(strings)
    missing, tail_only = [], []
    for name, owner in sorted(offered_names().items()):
        if name in strings or (name.startswith("__") and name in init_text):
            continue
        if any(s.endswith(name) for s in tails):
            tail_only.append(f"{owner}.{name}")
            continue
        missing.append(f"{owner}.{name}")
    print(f"tensorrt bindings {version}: {len(offered_names())} names offered by the double")
    if tail_only:
        print(f"found as the tail of a longer string: {', '.join(tail_only)}")
    if missing:
        print(f"NOT in the bindings: {', '.join(missing)}")
        return 1
    print("every name the double offers is in the bindings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
