#!/usr/bin/env bash
# CI for the subnet-72 miner (python -m miner). Idempotent, non-interactive.
# 1. Installs the `miner` extra (bittensor 10.x resolves; it only adds packages, never touches torch) into this
#    Python, so the main `python -m pytest -q` run also runs tests/test_miner.py.
# 2. Runs tests/test_miner.py once more under bittensor 9.12 (the subnet's pin), in .venv-miner-bt9: a venv that
#    sees this Python's packages (torch, the project) but has its own bittensor 9 stack (setuptools 70, fastapi 0.110,
#    async-substrate-interface 1.x), which would downgrade packages if installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import miner.bt" 2>/dev/null || pip install -q -e '.[miner]'
venv=.venv-miner-bt9
if ! "$venv/bin/python" -c "import bittensor, sys; sys.exit(not bittensor.__version__.startswith('9.12.'))" 2>/dev/null
then
  python -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q "bittensor==9.12.2" "async-substrate-interface<2"
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_miner.py
