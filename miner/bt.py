"""The one place that imports bittensor. 9.x spells the classes bt.axon/bt.dendrite/bt.wallet (9.x also has the
capitalised names), 10.x only bt.Axon/bt.Dendrite/bt.Wallet, 11.x has no Axon at all.

bittensor's logging machine lowers every logger that exists when it is configured (importing it configures it) to
CRITICAL and strips their handlers; `keep_logging` puts everyone else's loggers back as they were. Everything here
exists under both names in 9.x, so the shim picks the 10.x name first."""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


def _loggers() -> dict[str, logging.Logger]:
    found = {name: item for name, item in logging.root.manager.loggerDict.items() if isinstance(item, logging.Logger)}
    return found | {"": logging.root}


@contextlib.contextmanager
def keep_logging() -> Iterator[None]:
    """Restore the level, handlers, propagation and disabled flag of every non-bittensor logger."""
    saved = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for name, lg in _loggers().items()
             if not name.startswith("bittensor")}
    try:
        yield
    finally:
        for name, lg in _loggers().items():
            if name in saved:
                level, lg.handlers, lg.propagate, lg.disabled = saved[name]
                lg.setLevel(level)  # setLevel, not .level: it also clears the loggers' isEnabledFor caches


@contextlib.contextmanager
def _no_argv() -> Iterator[None]:
    """bittensor 9 parses sys.argv while importing (and answers --help with its own usage, then exits)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


with keep_logging(), _no_argv():
    try:
        import bittensor as bittensor  # noqa: PLC0414 (re-exported)
    except ModuleNotFoundError as e:
        if e.name != "bittensor":
            raise
        raise ModuleNotFoundError("the miner needs bittensor (9.9 to 10.x), which the base install leaves out: "
                                  "pip install -e '.[miner]'", name="bittensor") from None

VERSION: str = bittensor.__version__
_MAJOR = int(VERSION.split(".")[0])
if not hasattr(bittensor, "Axon") and not hasattr(bittensor, "axon"):
    raise ImportError(f"bittensor {VERSION} has no Axon (11.x is a lean SDK); the miner needs bittensor>=9.9,<11: "
                      "pip install -e '.[miner]'")


def _pick(new: str, old: str):
    return getattr(bittensor, new, None) or getattr(bittensor, old)


Axon = _pick("Axon", "axon")
Dendrite = _pick("Dendrite", "dendrite")
Wallet = _pick("Wallet", "wallet")
Subtensor = _pick("Subtensor", "subtensor")
Config = _pick("Config", "config")
Synapse = bittensor.Synapse
AxonInfo = bittensor.AxonInfo
TerminalInfo = bittensor.TerminalInfo
Keypair = bittensor.Keypair
btlogging = bittensor.logging
get_external_ip = bittensor.utils.networking.get_external_ip


def serve_outcome(result) -> tuple[bool, str]:
    """Whether Subtensor.serve_axon published the axon, and the chain's reason if not: 10.x answers an
    ExtrinsicResponse (truthy even on failure), 9.x a bool."""
    return bool(getattr(result, "success", result)), getattr(result, "message", None) or "no reason given"
