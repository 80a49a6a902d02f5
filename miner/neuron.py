"""The miner: an Axon serving ImageSynapse whose forward asks a backend (server URL or in-process Engine), with the
blacklist and stake priority of the subnet's miner, a background metagraph sync and /metrics.

No `from __future__ import annotations` here: Axon.attach compares the hooks' signatures with real classes
(`synapse: ImageSynapse`, `-> Tuple[bool, str]`, `-> float`), and string annotations would fail that check."""
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from miner.backends import Failure
from miner.bt import VERSION, Axon, TerminalInfo, get_external_ip, serve_outcome
from miner.gate import PriorityGate
from miner.metagraph import MetagraphSync
from miner.metrics import MinerMetrics
from miner.policy import AccessPolicy
from miner.protocol import ImageSynapse

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class AxonSettings:
    port: int = 8091
    bind_host: str = "0.0.0.0"            # bittensor's Axon always binds 0.0.0.0; tests bind 127.0.0.1
    external_ip: Optional[str] = None     # None: looked up at start (public_ip, a network call)
    external_port: Optional[int] = None
    max_workers: Optional[int] = None


def time_left_s(synapse: ImageSynapse, now_ns: int) -> float:
    """The caller's timeout less the time since it signed the request (its nonce is time.time_ns() then), less a
    margin for the answer's way back. A nonce from a skewed clock (in the future, or older than the timeout) is
    ignored rather than trusted."""
    timeout = float(synapse.timeout or 12.0)
    nonce = synapse.dendrite.nonce if synapse.dendrite is not None else None
    elapsed = 0.0 if nonce is None else (now_ns - nonce) / 1e9
    if not 0.0 <= elapsed <= timeout:
        elapsed = 0.0
    return timeout - elapsed - min(0.5, 0.1 * timeout)


def describe(e: BaseException) -> str:
    """An exception as one line for a user: some of bittensor's carry no message (ExternalIPNotFound)."""
    return str(e) or type(e).__name__


def public_ip() -> str:
    """This machine's public IP as bittensor finds it (asking checkip.amazonaws.com, ifconfig.me, ...). Looked up
    here rather than by Axon(): a lookup failing in there leaves a half-built Axon whose __del__ raises at exit."""
    log.info("looking up this machine's public IP for the axon to advertise (--axon.external_ip skips this)")
    try:
        return get_external_ip()
    except Exception as e:  # 10.x raises ExternalIPNotFound, 9.x whatever requests raised first
        raise OSError(f"cannot look up this machine's public IP, which the axon advertises to validators "
                      f"(bittensor's lookup failed: {describe(e)}): pass it with --axon.external_ip "
                      f"(any address, e.g. 127.0.0.1, with --no-serve)") from e


class Miner:
    def __init__(self, wallet: Any, backend: Any, metagraph: MetagraphSync, policy: AccessPolicy,
                 axon: AxonSettings = AxonSettings(), concurrency: int = 64,
                 metrics: Optional[MinerMetrics] = None) -> None:
        self.wallet = wallet
        self.backend = backend
        self.metagraph = metagraph
        self.policy = policy
        self.settings = axon
        self.gate = PriorityGate(concurrency)
        self.metrics = metrics or MinerMetrics()
        self.metrics.track(lambda: self.gate.waiting, lambda: self.gate.running, metagraph.age_s,
                           lambda: 0 if metagraph.view is None else len(metagraph.view.neurons))
        self.axon: Any = None
        self.metrics_server: Any = None

    @property
    def hotkey(self) -> str:
        return self.wallet.hotkey.ss58_address

    # --- the Axon's hooks ------------------------------------------------------------------------------

    def blacklist(self, synapse: ImageSynapse) -> Tuple[bool, str]:
        try:
            hotkey = synapse.dendrite.hotkey if synapse.dendrite is not None else None
            reason = self.policy.refusal(hotkey, self.metagraph.view)
        except Exception:  # a refusal, never a 500
            log.exception("blacklist check failed")
            reason = "the miner could not check this caller"
        if reason is None:
            return False, "allowed"
        self.metrics.requests.labels("blacklisted").inc()
        log.debug("refused: %s", reason)
        return True, reason

    def priority(self, synapse: ImageSynapse) -> float:
        try:
            return self.policy.priority(synapse.dendrite.hotkey if synapse.dendrite is not None else None,
                                        self.metagraph.view)
        except Exception:
            log.exception("priority lookup failed")
            return 0.0

    async def forward(self, synapse: ImageSynapse) -> ImageSynapse:
        """Fill synapse.prediction, or leave it at -1 with a failure status; back before the caller's deadline."""
        start = time.monotonic()
        budget = time_left_s(synapse, time.time_ns())
        deadline = start + budget
        try:
            try:
                await self.gate.acquire(self.priority(synapse), budget)
            except TimeoutError:
                raise Failure(504, "timeout", f"no forward slot free within {budget:.2f} s "
                                              f"({self.gate.running} running, {self.gate.waiting} waiting)") from None
            try:
                synapse.prediction = await self.backend.predict(synapse.image, deadline - time.monotonic())
            finally:
                self.gate.release()
            self.metrics.requests.labels("answered").inc()
        except Failure as failure:
            self._fail(synapse, failure)
        except Exception as e:  # a bug in the miner: still a clear answer, and a log line to find it
            log.exception("forward failed")
            self._fail(synapse, Failure(500, "internal_error", f"miner error: {e}"))
        finally:
            self.metrics.forward_latency.observe(time.monotonic() - start)
        return synapse

    def _fail(self, synapse: ImageSynapse, failure: Failure) -> None:
        outcome = "timed_out" if failure.status == 504 else "failed"
        self.metrics.requests.labels(outcome).inc()
        self.metrics.failures.labels(failure.reason).inc()
        log.warning("no prediction (%s): %s", failure.reason, failure.message)
        synapse.prediction = -1.0
        if synapse.axon is None:
            synapse.axon = TerminalInfo()
        synapse.axon.status_code = failure.status
        synapse.axon.status_message = f"{failure.reason}: {failure.message}"

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self, subtensor: Any = None, netuid: Optional[int] = None, metrics_host: str = "127.0.0.1",
              metrics_port: Optional[int] = None) -> None:
        """Start the metagraph sync, the Axon (served on chain first when a subtensor is given) and /metrics."""
        settings = self.settings
        external_ip = settings.external_ip or public_ip()  # first: a failed lookup leaves nothing to stop
        self.metagraph.start()
        self.axon = Axon(wallet=self.wallet, port=settings.port, external_ip=external_ip,
                         external_port=settings.external_port, max_workers=settings.max_workers)
        self.axon.fast_config.host = settings.bind_host  # the config its server object reads when it starts
        self.axon.attach(forward_fn=self.forward, blacklist_fn=self.blacklist, priority_fn=self.priority)
        if subtensor is not None:
            assert netuid is not None
            log.info("serving the axon on chain: netuid %d, %s:%d", netuid, self.axon.external_ip,
                     self.axon.external_port)
            published, why_not = serve_outcome(subtensor.serve_axon(netuid=netuid, axon=self.axon))
            if not published:
                raise RuntimeError(f"the chain did not publish the axon on netuid {netuid} ({why_not}): is the "
                                   f"hotkey registered there (btcli subnet register)? --no-serve skips publishing")
        self.axon.start()
        give_up = time.monotonic() + START_TIMEOUT_S
        while not self.axon.fast_server.started:  # a port in use never starts, and says so only in uvicorn's log
            if time.monotonic() > give_up:
                self.axon.stop()
                raise OSError(f"the axon did not start listening on {settings.bind_host}:{settings.port} within "
                              f"{START_TIMEOUT_S:g} s: if that port is in use, choose another with --axon.port")
            time.sleep(0.01)
        if metrics_port is not None:
            try:
                self.metrics_server = self.metrics.serve(metrics_host, metrics_port)
            except OSError as e:
                raise OSError(f"cannot serve /metrics on {metrics_host}:{metrics_port} ({describe(e)}): choose "
                              f"another --metrics-port, or -1 for none") from e
        log.info("axon listening on %s:%d as %s (bittensor %s)", settings.bind_host, settings.port, self.hotkey, VERSION)

    @property
    def metrics_port(self) -> Optional[int]:
        return None if self.metrics_server is None else self.metrics_server.server_port

    def stop(self) -> None:
        loop = getattr(self.backend, "loop", None)
        if loop is None:
            asyncio.run(self.backend.close())
        elif loop.is_running():  # the HTTP session belongs to the Axon's event loop: close it there
            asyncio.run_coroutine_threadsafe(self.backend.close(), loop).result(timeout=5)
        if self.axon is not None:
            self.axon.stop()
        self.metagraph.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
