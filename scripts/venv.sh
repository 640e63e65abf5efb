# Sourced by scripts/demo and scripts/test: create .venv (Python >= 3.11) and install the project.
# Usage: . scripts/venv.sh [extras]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_bin="${NILUS_PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "nilus-dagster needs Python >= 3.11 (set NILUS_PYTHON to one)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${1:+[$1]}"
export PATH="$PWD/.venv/bin:$PATH"
