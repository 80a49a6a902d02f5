"""`python -m miner`: the subnet-72 miner. Loads the wallet, starts the metagraph sync, serves the Axon on chain
(unless --no-serve), answers ImageSynapse from --server-url or an in-process --model until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from runtime.cascade.settings import ENGINE_HELP, add_engine_flags, engine_settings

try:
    from miner.bt import VERSION, Axon, Subtensor, Wallet, btlogging, keep_logging
except ImportError as e:  # no bittensor, or one without an Axon: say which extra, not a traceback
    sys.exit(f"python -m miner: {e}")

log = logging.getLogger("miner")

DEFAULT_NETUID = 72


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miner", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help="the subnet (72: NATIX StreetVision)")
    source = parser.add_argument_group("where predictions come from (exactly one)")
    source.add_argument("--server-url", help="the roadwork server (or nginx in front of replicas), e.g. "
                                             "http://127.0.0.1:8080; the miner POSTs to its /v1/predict")
    source.add_argument("--model", type=Path, help=f"{ENGINE_HELP['model']} to run in this process instead (one "
                                                   "image at a time; the server batches and caches)")
    add_engine_flags(parser, model=False)  # how the --model engine runs: the server's flags
    parser.add_argument("--concurrency", type=int, default=64,
                        help="forwards in flight at once; beyond it callers wait, highest stake first")
    parser.add_argument("--bind-host", default="0.0.0.0", help="address the axon listens on")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                        help="publish the axon's address on chain at start (--no-serve: a local run, no chain)")
    access = parser.add_argument_group("who may call")
    access.add_argument("--blacklist.force_validator_permit", dest="force_validator_permit",
                        action=argparse.BooleanOptionalAction, default=True,
                        help="refuse registered callers without a validator permit")
    access.add_argument("--blacklist.min_stake", dest="min_stake", type=float, default=1.0,
                        help="refuse registered callers with less stake")
    access.add_argument("--blacklist.allow", dest="allow", nargs="*", default=[], metavar="HOTKEY",
                        help="hotkeys served without the registration, permit and stake checks (e.g. your own "
                             "test Dendrite)")
    access.add_argument("--blacklist.deny", dest="deny", nargs="*", default=[], metavar="HOTKEY",
                        help="hotkeys always refused")
    meta = parser.add_argument_group("metagraph")
    meta.add_argument("--metagraph.sync_interval_s", dest="sync_interval_s", type=float, default=300.0,
                      help="seconds between metagraph syncs (a failed sync retries after 10 s; serving goes on "
                           "from the last good one)")
    meta.add_argument("--metagraph.static", dest="static_metagraph", type=Path,
                      help="JSON list of {hotkey, stake, validator_permit} used instead of the chain (local checks)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the miner's /metrics")
    parser.add_argument("--metrics-port", type=int, default=9091, help="port of the miner's /metrics (-1: off)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="level of the miner's own log lines (bittensor's: --logging.*)")
    Wallet.add_args(parser)
    Subtensor.add_args(parser)
    Axon.add_args(parser)
    btlogging.add_args(parser)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Plain argparse: bittensor 10's Config ignores the command line unless BT_NO_PARSE_CLI_ARGS=false. Its own
    options keep their dotted names (read them with opt(config, "wallet.name"))."""
    parser = build_parser()
    config = parser.parse_args(argv)
    if (config.server_url is None) == (config.model is None):
        parser.error("give exactly one of --server-url or --model")
    config.engine = None if config.model is None else engine_settings(parser, config)
    if config.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {config.concurrency}")
    if config.sync_interval_s <= 0:
        parser.error(f"--metagraph.sync_interval_s must be > 0, got {config.sync_interval_s}")
    return config


def opt(config: argparse.Namespace, name: str):
    return getattr(config, name)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse(argv)
    with keep_logging():
        btlogging(debug=opt(config, "logging.debug"), trace=opt(config, "logging.trace"),
                  info=opt(config, "logging.info"), record_log=opt(config, "logging.record_log"),
                  logging_dir=opt(config, "logging.logging_dir"))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("miner").setLevel(config.log_level.upper())

    from miner.backends import EngineBackend, ServerBackend
    from miner.metagraph import ChainSource, MetagraphSync, load_static
    from miner.neuron import AxonSettings, Miner, describe
    from miner.policy import AccessPolicy

    try:
        policy = AccessPolicy(config.force_validator_permit, config.min_stake, frozenset(config.allow),
                              frozenset(config.deny))
        wallet = Wallet(name=opt(config, "wallet.name"), hotkey=opt(config, "wallet.hotkey"),
                        path=opt(config, "wallet.path"))
        wallet.hotkey  # unlocks or fails now, not at the first request  # noqa: B018
        wallet.coldkeypub  # noqa: B018
    except Exception as e:
        log.error("cannot load the wallet %s/%s under %s (%s): point --wallet.name/--wallet.hotkey/--wallet.path at "
                  "an existing one, or make it with btcli wallet create", opt(config, "wallet.name"),
                  opt(config, "wallet.hotkey"), opt(config, "wallet.path"), describe(e))
        return 1
    endpoint = opt(config, "subtensor.chain_endpoint")  # has a default (finney's): only an explicit one wins
    explicit = endpoint != build_parser().get_default("subtensor.chain_endpoint")
    network = endpoint if explicit else opt(config, "subtensor.network")

    def new_subtensor():
        return Subtensor(network=network)

    if config.static_metagraph is not None:
        try:
            view = load_static(config.static_metagraph)
        except (OSError, ValueError) as e:
            log.error("cannot read --metagraph.static: %s", describe(e))
            return 1
        source = lambda: view  # noqa: E731
    else:
        source = ChainSource(new_subtensor, config.netuid)
    if config.server_url is not None:
        backend = ServerBackend(config.server_url, connections=config.concurrency)
    else:
        from runtime.errors import ModelLoadError
        try:
            backend = EngineBackend(config.engine)
        except ModelLoadError as e:
            log.error("cannot load --model %s: %s", config.model, describe(e))
            return 1
        backend.warmup()

    subtensor = None  # after the model: an early return leaves no connection open
    if config.serve:
        try:
            subtensor = new_subtensor()
        except Exception as e:
            log.error("cannot connect to subtensor %s to serve the axon (%s): check --subtensor.network or "
                      "--subtensor.chain_endpoint, or run without the chain with --no-serve", network, describe(e))
            return 1

    axon = AxonSettings(port=opt(config, "axon.port"), bind_host=config.bind_host,
                        external_ip=opt(config, "axon.external_ip"), external_port=opt(config, "axon.external_port"),
                        max_workers=opt(config, "axon.max_workers"))
    miner = Miner(wallet, backend, MetagraphSync(source, config.sync_interval_s), policy, axon, config.concurrency)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        miner.start(subtensor, config.netuid, config.metrics_host,
                    None if config.metrics_port < 0 else config.metrics_port)
    except Exception as e:
        log.error("cannot start the miner: %s", describe(e))
        miner.stop()
        return 1
    finally:
        if subtensor is not None:
            subtensor.close()  # only serving the axon needed it
    log.info("mining on netuid %d with %s (bittensor %s); /metrics on %s:%s", config.netuid, backend.url, VERSION,
             config.metrics_host, miner.metrics_port)
    if miner.metagraph.wait_synced(60) and miner.metagraph.view.get(miner.hotkey) is None \
            and config.static_metagraph is None:
        log.warning("hotkey %s is not registered on netuid %d: validators will not find this axon", miner.hotkey,
                    config.netuid)
    stop.wait()
    log.info("shutting down")
    miner.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
