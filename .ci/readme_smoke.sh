#!/usr/bin/env bash
# The README's first command on a clean environment: a fresh virtual environment (no system site-packages, no
# test extra), `pip install -e .`, `python -m server`, /readyz, one prediction, stop. Fails on a missing runtime
# dependency that the test extra would otherwise hide. Idempotent: the venv is recreated on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.ci/venv-readme          # git-ignored
PORT=${README_SMOKE_PORT:-18080}
READY_WAIT_S=${README_SMOKE_READY_S:-300}

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e .
# torch==2.13.0 must have resolved to the CPU build on a machine without CUDA, never a multi-GB CUDA one.
"$VENV/bin/python" -c 'import torch; v = torch.__version__; print("torch", v); assert torch.version.cuda is None or "+cpu" in v or torch.cuda.is_available(), v'

log=$(mktemp)
"$VENV/bin/python" -m server --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

ready=0
for _ in $(seq 1 "$READY_WAIT_S"); do
  if ! kill -0 "$pid" 2>/dev/null; then echo "server exited before ready:"; cat "$log"; exit 1; fi
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then ready=1; break; fi
  sleep 1
done
[ "$ready" = 1 ] || { echo "server not ready within ${READY_WAIT_S} s:"; cat "$log"; exit 1; }

answer=$(curl -sf -H 'Content-Type: image/jpeg' --data-binary @samples/roadwork_1.jpg "http://127.0.0.1:$PORT/v1/predict")
echo "prediction: $answer"
"$VENV/bin/python" -c 'import json, sys; a = json.loads(sys.argv[1]); assert 0 <= a["prediction"] <= 1, a' "$answer"
kill -TERM "$pid"
wait "$pid"   # exit 0 after draining
trap 'rm -f "$log"' EXIT
echo "readme smoke: ok"
