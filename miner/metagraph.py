"""Who may call the miner: a view of the subnet's metagraph (hotkey -> uid, stake, validator permit), where it comes
from (the chain, or a static JSON file for tests and local checks), and a thread that keeps it fresh."""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neuron:
    uid: int
    stake: float
    validator_permit: bool


@dataclass(frozen=True)
class MetagraphView:
    neurons: Mapping[str, Neuron]  # by hotkey
    block: int | None = None
    synced_at: float = field(default_factory=time.time)

    @classmethod
    def from_columns(cls, hotkeys: Sequence[str], stakes: Sequence[float], permits: Sequence[bool],
                     block: int | None = None) -> MetagraphView:
        assert len(hotkeys) == len(stakes) == len(permits), (len(hotkeys), len(stakes), len(permits))
        return cls({hotkey: Neuron(uid, float(stake), bool(permit))
                    for uid, (hotkey, stake, permit) in enumerate(zip(hotkeys, stakes, permits))}, block)

    def get(self, hotkey: str) -> Neuron | None:
        return self.neurons.get(hotkey)


def load_static(path: str | Path) -> MetagraphView:
    """A JSON list of {"hotkey": ss58, "stake": number, "validator_permit": bool}, uids in list order."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of neurons, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("hotkey"), str):
            raise ValueError(f"{path}: neuron {i} needs a string 'hotkey'")
    return MetagraphView.from_columns([r["hotkey"] for r in rows], [float(r.get("stake", 0.0)) for r in rows],
                                      [bool(r.get("validator_permit", False)) for r in rows])


class ChainSource:
    """Reads the subnet's metagraph from a subtensor; the connection opens on first use and reopens after a failure."""

    def __init__(self, subtensor_factory: Callable[[], Any], netuid: int) -> None:
        self.subtensor_factory = subtensor_factory
        self.netuid = netuid
        self.subtensor: Any = None

    def __call__(self) -> MetagraphView:
        if self.subtensor is None:
            self.subtensor = self.subtensor_factory()
        try:
            metagraph = self.subtensor.metagraph(self.netuid)
        except Exception:
            self.subtensor = None
            raise
        return MetagraphView.from_columns(list(metagraph.hotkeys), [float(s) for s in metagraph.S],
                                          [bool(p) for p in metagraph.validator_permit], int(metagraph.block))


class MetagraphSync:
    """The latest view, refreshed every `interval_s` on a daemon thread. A failed refresh keeps the last good view
    (serving goes on while the chain is unreachable) and retries sooner."""

    def __init__(self, source: Callable[[], MetagraphView], interval_s: float, retry_s: float = 10.0) -> None:
        assert interval_s > 0 and retry_s > 0
        self.source = source
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.view: MetagraphView | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync_once(self) -> bool:
        try:
            view = self.source()
        except Exception as e:
            self.failures += 1
            log.warning("metagraph sync failed (%s); serving from the view of %s", e, self._age_text())
            return False
        self.view = view
        log.info("metagraph synced: %d neurons, %d with a validator permit, block %s", len(view.neurons),
                 sum(n.validator_permit for n in view.neurons.values()), view.block)
        return True

    def age_s(self) -> float:
        """Seconds since the last good sync; inf before the first."""
        view = self.view
        return math.inf if view is None else time.time() - view.synced_at

    def _age_text(self) -> str:
        age = self.age_s()
        return "nothing yet" if math.isinf(age) else f"{age:.0f} s ago"

    def start(self) -> None:
        assert self._thread is None, "already started"
        self._thread = threading.Thread(target=self._run, name="metagraph-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval_s if self.sync_once() else self.retry_s
            self._stop.wait(wait)

    def wait_synced(self, timeout_s: float) -> bool:
        give_up = time.monotonic() + timeout_s
        while self.view is None and time.monotonic() < give_up and not self._stop.is_set():
            time.sleep(0.01)
        return self.view is not None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
