"""`python -m deploy up`: the stack on this machine until Ctrl-C; `python -m deploy render`: the configs for yours."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from deploy.render import DEFAULT_PUBLIC_PORT, DEFAULT_REPLICA_PORT, Layout, compose_files, render
from deploy.stack import REPO_DIR, Stack, StackError, StackSpec

log = logging.getLogger("deploy")


def up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="roadwork-stack-"))
    spec = StackSpec(run_dir=run_dir, replicas=args.replicas, model=Path(args.model), public_port=args.port,
                     replica_port=args.replica_port, redis_port=args.redis_port,
                     prometheus_port=args.prometheus_port, redis=not args.no_redis,
                     server_args=tuple(args.server_arg))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(spec)
    log.info("starting %d replica(s); configs and logs in %s", spec.replicas, stack.run_dir)
    try:
        stack.start()
    except StackError as e:
        log.error("%s", e)
        return 1
    try:
        lines = [f"roadwork stack ready ({spec.replicas} replica(s); logs in {stack.run_dir})",
                 f"  predictions (nginx):  {stack.public_url}/v1/predict  and  {stack.public_url}/ImageSynapse"]
        lines += [f"  replica {i + 1}:            {stack.replica_url(i)}  (metrics: {stack.replica_url(i)}/metrics)"
                  for i in range(spec.replicas)]
        if spec.redis:
            lines.append(f"  redis:                {stack.redis_url}")
        if spec.prometheus_port:
            lines.append(f"  prometheus:           {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)")
        lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), flush=True)
        while not stop.wait(1.0):
            for child in [stack.nginx, *stack.replicas]:
                if child.process is not None and not child.running:
                    log.error("%s exited with %s; stopping the stack. Its log ends:\n%s", child.name,
                              child.process.returncode, child.log_tail())
                    return 1
        log.info("stopping: nginx, then the replicas (draining), Prometheus and Redis")
        return 0
    finally:
        stack.stop()
        log.info("stopped")


def render_cmd(args: argparse.Namespace) -> int:
    if args.compose:
        for path, text in compose_files().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(path)
        return 0
    layout = Layout(replicas=tuple(args.replica), listen=args.listen, run_dir=args.run_dir,
                    error_log=f"{args.log_dir}/roadwork-error.log", access_log=f"{args.log_dir}/roadwork-access.log",
                    max_body_mb=args.max_body_mb, rate_per_s=args.rate_per_s, burst=args.burst,
                    scrape_interval=args.scrape_interval, alertmanager=args.alertmanager)
    for path in render(layout, Path(args.out)).values():
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("up", help="run Redis, N replicas, nginx and Prometheus here until Ctrl-C")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--model", default=str(REPO_DIR / "bundles" / "default"))
    p.add_argument("--port", type=int, default=DEFAULT_PUBLIC_PORT, help="nginx's public port (default 8080)")
    p.add_argument("--replica-port", type=int, default=DEFAULT_REPLICA_PORT,
                   help="first replica's port; replica i uses this + i (default 8101: the miner's axon has 8091)")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--prometheus-port", type=int, default=9090, help="0: no Prometheus")
    p.add_argument("--no-redis", action="store_true", help="replicas without the shared cache")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more `python -m server` argument for every replica (repeat: --server-arg=--max-batch "
                        "--server-arg=4)")
    p.add_argument("--run-dir", help="configs, logs and Prometheus data (default: a new temporary directory)")
    p.set_defaults(func=up)

    p = commands.add_parser("render", help="write nginx.conf, prometheus.yml and alerts.yml for your addresses")
    p.add_argument("--out", help="output directory")
    p.add_argument("--compose", action="store_true", help="rewrite deploy/compose/ (deploy/compose.yml's configs)")
    p.add_argument("--replica", action="append", default=[], metavar="HOST:PORT",
                   help="a replica's address; repeat for each (default: 127.0.0.1:8101..8103)")
    p.add_argument("--listen", default=f"{DEFAULT_PUBLIC_PORT}", help="nginx listen address (default 8080)")
    p.add_argument("--run-dir", default="/var/lib/nginx", help="nginx pid and temp files")
    p.add_argument("--log-dir", default="/var/log/nginx")
    p.add_argument("--max-body-mb", type=int, default=32, help="the servers' --max-body-mb")
    p.add_argument("--rate-per-s", type=int, default=200, help="requests/s per client address")
    p.add_argument("--burst", type=int, default=400)
    p.add_argument("--scrape-interval", default="15s")
    p.add_argument("--alertmanager", default="127.0.0.1:9093")
    p.set_defaults(func=render_cmd)

    args = parser.parse_args(argv)
    if args.command == "render":
        if not args.compose and not args.out:
            parser.error("render needs --out DIR (or --compose)")
        if not args.replica:
            args.replica = [f"127.0.0.1:{DEFAULT_REPLICA_PORT + i}" for i in range(3)]
    if args.command == "up" and args.replicas < 1:
        parser.error("--replicas must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
