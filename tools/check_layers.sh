#!/usr/bin/env bash
# The import contracts of pyproject.toml ([tool.importlinter]), checked on an installed copy of
# the package: in the checkout, runtime/, engines/ and export/ are mapped into adadiff by
# setuptools' package-dir, which import-linter cannot follow; installed, they sit inside adadiff/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PY:-$root/.venv/bin/python}
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
"$PY" -m pip install -q --no-deps --target "$target/site" . >/dev/null
# benchmarks/ (a root package of the contracts) comes from the checkout, adadiff from the copy.
ln -s "$root/benchmarks" "$target/site/benchmarks"
cd "$target"
PYTHONPATH="$target/site" "$PY" -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' --config "$root/pyproject.toml" --no-cache
