#!/usr/bin/env bash
# The checks that run on an installed copy of the package (in .ci/run after the tests): the import
# contracts of pyproject.toml ([tool.importlinter]) and the types ([tool.mypy]) of the package and
# the benchmark scripts. In the checkout,
# runtime/, engines/ and export/ are mapped into adadiff by setuptools' package-dir, which neither
# tool can follow; installed, they sit inside adadiff/ as users get them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PY:-$root/.venv/bin/python}
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
# setuptools builds in build/ and would package a stale module left there by an earlier build
rm -rf "$root/build"
"$PY" -m pip install -q --no-deps --target "$target/site" . >/dev/null
# benchmarks/ (a root package of the contracts) comes from the checkout, adadiff from the copy.
ln -s "$root/benchmarks" "$target/site/benchmarks"
cd "$target/site"
echo "lint-imports:"
PYTHONPATH="$target/site" "$PY" -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' --config "$root/pyproject.toml" --no-cache | sed -n '/^Contracts/,$p' | tail -n +3
echo "mypy:"
"$PY" -m mypy --config-file "$root/pyproject.toml" --cache-dir "$target/mypy-cache" -p adadiff -p benchmarks
