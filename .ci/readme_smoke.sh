#!/usr/bin/env bash
# The README's first command on a clean environment: a fresh virtual environment (no system site-packages, no
# test extra), `pip install -e .`, `python -m server`, /readyz, one prediction, stop. Fails on a missing runtime
# dependency that the test extra would otherwise hide. Then the same from a wheel (`pip wheel .`) installed in
# that environment and started from an empty directory: the bundled model ships as package data. Neither
# install may bring triton (a CPU install runs the torch references). Idempotent: the venv is recreated.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.ci/venv-readme    # git-ignored
PORT=${README_SMOKE_PORT:-18080}
READY_WAIT_S=${README_SMOKE_READY_S:-300}

# Start `python -m server` in the current directory, wait for /readyz, predict one sample, SIGTERM, exit 0.
smoke() {
  local log pid ready answer
  log=$(mktemp)
  "$VENV/bin/python" -m server --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
  pid=$!
  ready=0
  for _ in $(seq 1 "$READY_WAIT_S"); do
    if ! kill -0 "$pid" 2>/dev/null; then echo "server exited before ready:"; cat "$log"; return 1; fi
    if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then ready=1; break; fi
    sleep 1
  done
  if [ "$ready" != 1 ]; then echo "server not ready within ${READY_WAIT_S} s:"; cat "$log"; kill "$pid"; return 1; fi
  answer=$(curl -sf -H 'Content-Type: image/jpeg' --data-binary @"$REPO/samples/roadwork_1.jpg" \
           "http://127.0.0.1:$PORT/v1/predict") || { kill "$pid"; cat "$log"; return 1; }
  echo "prediction: $answer"
  "$VENV/bin/python" -c 'import json, sys; a = json.loads(sys.argv[1]); assert 0 <= a["prediction"] <= 1, a' "$answer"
  kill -TERM "$pid"
  wait "$pid"   # exit 0 after draining
  rm -f "$log"
}

no_triton() {
  if "$VENV/bin/python" -c 'import triton' 2>/dev/null; then echo "triton was installed without the gpu extra"; return 1; fi
}

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e .
# torch==2.13.0 must have resolved to the CPU build on a machine without CUDA, never a multi-GB CUDA one.
"$VENV/bin/python" -c 'import torch; v = torch.__version__; print("torch", v); assert torch.version.cuda is None or "+cpu" in v or torch.cuda.is_available(), v'
no_triton
smoke

wheels=$(mktemp -d) && empty=$(mktemp -d)
trap 'rm -rf "$wheels" "$empty"' EXIT
"$VENV/bin/pip" wheel -q --no-deps -w "$wheels" .
"$VENV/bin/pip" uninstall -q -y roadwork-cascade
"$VENV/bin/pip" install -q "$wheels"/roadwork_cascade-*.whl
no_triton
(cd "$empty" && smoke)
echo "readme smoke: ok (editable install and wheel)"
