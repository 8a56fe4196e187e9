#!/usr/bin/env bash
# Builds the wheel and proves it installs in a fresh venv with the CLI and every plugin package.
set -euo pipefail
python="$1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m build --wheel --outdir "$work/dist" . >/dev/null
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$work"/dist/meshware-*.whl
"$work/venv/bin/meshware" --version
"$work/venv/bin/meshware" --help >/dev/null
(cd "$work" && "$work/venv/bin/python" -c "import meshware, meshware_fastapi, meshware_flask, meshware_django; print('wheel ok:', meshware.__version__)")
