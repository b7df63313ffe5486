#!/usr/bin/env bash
# Create the project's virtual environment and install mempool with its dev tools.
# On a machine without CUDA, torch comes from torch==2.13.0 (on this project's machines a local CPU
# wheel for Python 3.11; any other spec, or another Python, pulls several GB of CUDA packages).
# Where the system Python already has a CUDA torch, the venv sees it (--system-site-packages) and
# keeps it. The ucx extra is installed too, so both transport backends are tested.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,ucx,serving}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bootstrap: keeping the system's CUDA torch"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0"
  # with numpy: torch warns on import when numpy is missing (the check below imports it)
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" numpy
fi
# ucxx is built per CUDA major. Beside a torch built for CUDA 13 (PyPI's torch==2.13.0, which every
# Python gets but the one this project's machines have a local CPU wheel for), take the ucx-cu13
# extra: with ucx (ucxx-cu12), pip resolves by replacing that torch with an older CUDA 12 build
if [[ ",$EXTRAS," == *,ucx,* ]] &&
  "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if (torch.version.cuda or "").startswith("13.") else 1)'; then
  EXTRAS=$(echo ",$EXTRAS," | sed 's/,ucx,/,ucx-cu13,/; s/^,//; s/,$//')
fi
echo "bootstrap: installing mempool[$EXTRAS]"
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
