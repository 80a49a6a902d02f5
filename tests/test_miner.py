"""The miner: a real bittensor Axon on 127.0.0.1 queried by real Dendrites with generated hotkeys; no chain. The
metagraph is a static list given to the miner. The cascade is a real `python -m server` process (or an in-process
Engine); the failure cases that a healthy server cannot produce on demand (too slow, held) use a small aiohttp
upstream started here."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

bt = pytest.importorskip("miner.bt", reason="the miner needs bittensor 9.x or 10.x: pip install -e '.[miner]' "
                                            "(.ci/miner.sh)")

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from miner.backends import EngineBackend, ServerBackend  # noqa: E402
from miner.gate import PriorityGate  # noqa: E402
from miner.metagraph import MetagraphSync, MetagraphView, load_static  # noqa: E402
from miner.neuron import AxonSettings, Miner, time_left_s  # noqa: E402
from miner.policy import AccessPolicy  # noqa: E402
from miner.protocol import ImageSynapse  # noqa: E402
from fixtures.checkpoints import make_vit  # noqa: E402
from fixtures.images import jpeg  # noqa: E402
from fixtures.serving import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# What the Dendrite believes its own external IP is: a label sent in its headers, never connected to. It must differ
# from the Axon's address, or the Dendrite would dial 0.0.0.0 ("myself") instead of 127.0.0.1.
DENDRITE_LABEL_IP = "127.0.0.2"
TIMEOUT_S = 4.0
HIGH, LOW_STAKE = 10_000.0, 0.5


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def keypair():
    return bt.Keypair.create_from_mnemonic(bt.Keypair.generate_mnemonic())


def make_wallet(path: Path):
    wallet = bt.Wallet(name="miner", hotkey="default", path=str(path))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


def dendrite(key):
    with mock.patch("bittensor.utils.networking.get_external_ip", return_value=DENDRITE_LABEL_IP):
        return bt.Dendrite(wallet=key)


async def query(key, info, image: str, timeout: float = TIMEOUT_S, synapse_class=ImageSynapse):
    """One Dendrite call; returns the answered synapse and the seconds it took."""
    d = dendrite(key)
    try:
        start = time.monotonic()
        answer = await d.forward(axons=info, synapse=synapse_class(image=image), timeout=timeout, deserialize=False)
        return answer, time.monotonic() - start
    finally:
        await d.aclose_session()


def metric(port: int, line: str) -> float:
    text = urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
    assert found, f"{line} not in /metrics"
    return float(found.group(1))


# --- the people in the static metagraph ------------------------------------------------------------------------

class People:
    def __init__(self) -> None:
        self.validators = [keypair() for _ in range(32)]  # stakes 1000, 1100, ... all with permits
        self.no_permit = keypair()
        self.low_stake = keypair()
        self.denied = keypair()
        self.allowed = keypair()      # not registered, on the allowlist
        self.stranger = keypair()     # not registered
        self.stakes = {k.ss58_address: 1000.0 + 100 * i for i, k in enumerate(self.validators)}

    def view(self) -> MetagraphView:
        rows = [(k.ss58_address, self.stakes[k.ss58_address], True) for k in self.validators]
        rows += [(self.no_permit.ss58_address, HIGH, False), (self.low_stake.ss58_address, LOW_STAKE, True),
                 (self.denied.ss58_address, HIGH, True)]
        return MetagraphView.from_columns(*zip(*rows))

    def policy(self) -> AccessPolicy:
        return AccessPolicy(force_validator_permit=True, min_stake=1.0, allow=frozenset({self.allowed.ss58_address}),
                            deny=frozenset({self.denied.ss58_address}))


@pytest.fixture(scope="module")
def people() -> People:
    return People()


@contextlib.contextmanager
def running_miner(tmp_path: Path, people: People, backend, concurrency: int = 64):
    view = people.view()
    miner = Miner(make_wallet(tmp_path), backend, MetagraphSync(lambda: view, interval_s=3600), people.policy(),
                  AxonSettings(port=free_port(), bind_host=LOOPBACK, external_ip=LOOPBACK), concurrency=concurrency)
    miner.start(metrics_host=LOOPBACK, metrics_port=0)
    try:
        assert miner.metagraph.wait_synced(5)
        yield miner
    finally:
        miner.stop()


# --- a real server process -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=5)
    return path


@pytest.fixture(scope="module")
def server_url(model_dir):
    # The result cache on, as a miner's server runs: a re-asked image gets the very answer the miner forwarded.
    with ServerProcess(model_dir, cache=True) as server:
        yield server.url


def server_prediction(url: str, image: bytes) -> float:
    request = urllib.request.Request(url + "/v1/predict", data=image, headers={"Content-Type": "image/jpeg"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())["prediction"]


@pytest.fixture(scope="module")
def miner(tmp_path_factory, people, server_url):
    with running_miner(tmp_path_factory.mktemp("wallet"), people, ServerBackend(server_url)) as m:
        yield m


# --- a small upstream whose speed the test controls ------------------------------------------------------------

class Upstream:
    """An aiohttp app on its own loop thread speaking /v1/predict: answers 0.25 after `delay_s`; while `hold` is
    clear, the first request waits for it. Records the images in the order they arrived."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.seen: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    async def predict(self, request: web.Request) -> web.Response:
        image = (await request.json())["image"]
        self.seen.append(image)
        while not self.hold.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(self.delay_s)
        return web.json_response({"prediction": 0.25})

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/predict", self.predict)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, LOOPBACK, 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://{LOOPBACK}:{self.runner.addresses[0][1]}"
        self.started.set()
        self.loop.run_forever()

    def close(self) -> None:
        self.hold.set()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def upstream():
    up = Upstream()
    try:
        yield up
    finally:
        up.close()


# --- tests: answers --------------------------------------------------------------------------------------------

def test_validator_gets_the_servers_prediction(miner, people, server_url):
    image = jpeg(1, (224, 224))
    answered = metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="answered"}')
    answer, took = asyncio.run(query(people.validators[0], miner.axon.info(), b64(image)))
    assert answer.dendrite.status_code == 200, answer.dendrite.status_message
    assert answer.deserialize() == server_prediction(server_url, image)
    assert 0.0 <= answer.prediction <= 1.0 and took < TIMEOUT_S
    assert metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="answered"}') == answered + 1
    assert metric(miner.metrics_port, "roadwork_miner_forward_seconds_count") >= 1
    assert 0 <= metric(miner.metrics_port, "roadwork_miner_metagraph_sync_age_seconds") < 60


def test_refusals_carry_the_blacklist_reason(miner, people):
    info, image = miner.axon.info(), b64(jpeg(2))
    cases = {people.stranger: "is not registered", people.no_permit: "has no validator permit",
             people.low_stake: "below the minimum 1", people.denied: "is denylisted"}
    blacklisted = metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="blacklisted"}')

    async def scenario():
        return await asyncio.gather(*(query(key, info, image) for key in cases),
                                    query(people.allowed, info, image))

    *refused, (allowed, _) = asyncio.run(scenario())
    for (answer, _), reason in zip(refused, cases.values()):
        assert answer.dendrite.status_code == 403, answer.dendrite.status_message
        assert reason in answer.dendrite.status_message, answer.dendrite.status_message
        assert answer.deserialize() == -1.0
    assert allowed.dendrite.status_code == 200, "an allowlisted hotkey is served without registration"
    assert metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="blacklisted"}') == blacklisted + 4


class HashingImageSynapse(ImageSynapse):
    """A client whose synapse hashes `image` into the signed body hash, which the subnet's synapse does not."""
    required_hash_fields = ("image",)


HashingImageSynapse.__name__ = "ImageSynapse"  # the route is the class name


def test_tampered_requests_are_refused_by_the_axon(miner, people):
    """The subnet's ImageSynapse hashes no body field (wire compatibility keeps ours the same), so the signature
    covers the header hash, not the image. What the Axon checks, it enforces: a header hash that does not match the
    body is refused before the forward; a hash altered after signing fails the signature; a replayed nonce fails."""
    info, image = miner.axon.info(), b64(jpeg(3))
    key = people.validators[1]
    answered = metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="answered"}')

    mismatch, _ = asyncio.run(query(key, info, image, synapse_class=HashingImageSynapse))
    assert mismatch.dendrite.status_code != 200 and mismatch.deserialize() == -1.0

    async def raw_posts():
        d = dendrite(key)
        try:
            synapse = d.preprocess_synapse_for_request(info, ImageSynapse(image=image), TIMEOUT_S)
            url = f"http://{LOOPBACK}:{info.port}/ImageSynapse"
            body = synapse.model_dump()
            async with aiohttp.ClientSession() as session:
                headers = synapse.to_headers() | {"computed_body_hash": "0" * 64}
                async with session.post(url, json=body, headers=headers) as r:
                    forged = r.status, r.headers.get("bt_header_axon_status_message", "")
                async with session.post(url, json=body, headers=synapse.to_headers()) as r:
                    first = r.status
                async with session.post(url, json=body, headers=synapse.to_headers()) as r:
                    replay = r.status, r.headers.get("bt_header_axon_status_message", "")
            return forged, first, replay
        finally:
            await d.aclose_session()

    forged, first, replay = asyncio.run(raw_posts())
    assert forged[0] == 401 and "Signature mismatch" in forged[1], forged
    assert first == 200
    assert replay[0] == 401 and "Nonce is too old" in replay[1], replay
    assert metric(miner.metrics_port, 'roadwork_miner_requests_total{outcome="answered"}') == answered + 1


def test_undecodable_image_answers_400_then_keeps_serving(miner, people, server_url):
    info, key = miner.axon.info(), people.validators[2]
    failed = metric(miner.metrics_port, 'roadwork_miner_failures_total{reason="bad_image"}')
    garbage, _ = asyncio.run(query(key, info, b64(b"\xff\xd8 this is not a jpeg")))
    not_base64, _ = asyncio.run(query(key, info, "%%% not base64 %%%"))
    for answer in (garbage, not_base64):
        assert answer.dendrite.status_code == 400 and answer.deserialize() == -1.0
        assert answer.dendrite.status_message.startswith("bad_image: the server answered 4")
    image = jpeg(4)
    after, _ = asyncio.run(query(key, info, b64(image)))
    assert after.dendrite.status_code == 200 and after.prediction == server_prediction(server_url, image)
    assert metric(miner.metrics_port, 'roadwork_miner_failures_total{reason="bad_image"}') == failed + 2


def test_32_concurrent_queries_all_answered(miner, people, server_url):
    images = [jpeg(100 + i, (224, 224)) for i in range(32)]

    async def scenario():
        return await asyncio.gather(*(query(key, miner.axon.info(), b64(im))
                                      for key, im in zip(people.validators, images)))

    answers = asyncio.run(scenario())
    assert [a.dendrite.status_code for a, _ in answers] == [200] * 32
    assert [a.prediction for a, _ in answers] == [server_prediction(server_url, im) for im in images]
    assert max(took for _, took in answers) < TIMEOUT_S


# --- tests: failures answer within the timeout -----------------------------------------------------------------

def test_server_down_answers_503_at_once_and_keeps_serving(tmp_path, people):
    with running_miner(tmp_path, people, ServerBackend(f"http://{LOOPBACK}:{free_port()}")) as m:
        for _ in range(2):
            answer, took = asyncio.run(query(people.validators[3], m.axon.info(), b64(jpeg(5))))
            assert answer.dendrite.status_code == 503, answer.dendrite.status_message
            assert "server_unreachable: cannot reach the server" in answer.dendrite.status_message
            assert answer.deserialize() == -1.0 and took < 2.0
        assert metric(m.metrics_port, 'roadwork_miner_requests_total{outcome="failed"}') == 2


def test_slow_server_answers_504_before_the_timeout_then_recovers(tmp_path, people, upstream):
    upstream.delay_s = 30.0
    timeout = 2.0
    with running_miner(tmp_path, people, ServerBackend(upstream.url)) as m:
        answer, took = asyncio.run(query(people.validators[4], m.axon.info(), b64(jpeg(6)), timeout=timeout))
        assert answer.dendrite.status_code == 504, (answer.dendrite.status_code, answer.dendrite.status_message)
        assert "did not answer within" in answer.dendrite.status_message
        assert took < timeout, "the miner answers before the Dendrite gives up"
        assert metric(m.metrics_port, 'roadwork_miner_requests_total{outcome="timed_out"}') == 1
        upstream.delay_s = 0.0
        answer, _ = asyncio.run(query(people.validators[4], m.axon.info(), b64(jpeg(7)), timeout=timeout))
        assert answer.dendrite.status_code == 200 and answer.prediction == 0.25


def test_priority_is_stake_order_under_load(tmp_path, people, upstream):
    """One forward at a time: the first query holds the upstream until 31 more wait for the slot; they then reach
    the upstream highest stake first, whatever order they arrived in."""
    upstream.hold.clear()
    keys = people.validators
    image_of = {k.ss58_address: b64(jpeg(300 + i)) for i, k in enumerate(keys)}
    with running_miner(tmp_path, people, ServerBackend(upstream.url), concurrency=1) as m:
        info = m.axon.info()

        async def scenario():
            first = asyncio.create_task(query(keys[0], info, image_of[keys[0].ss58_address], timeout=30))
            while not upstream.seen:
                await asyncio.sleep(0.005)
            rest = [asyncio.create_task(query(k, info, image_of[k.ss58_address], timeout=30)) for k in keys[1:]]
            give_up = time.monotonic() + 20
            while await asyncio.to_thread(metric, m.metrics_port, "roadwork_miner_waiting") < 31:
                assert time.monotonic() < give_up, "31 queries never queued at the gate"
                await asyncio.sleep(0.01)
            upstream.hold.set()
            return await asyncio.gather(first, *rest)

        answers = asyncio.run(scenario())
    assert [a.dendrite.status_code for a, _ in answers] == [200] * 32
    stake_of_image = {image_of[k]: people.stakes[k] for k in image_of}
    order = [stake_of_image[im] for im in upstream.seen[1:]]
    assert order == sorted(order, reverse=True), order


# --- tests: in-process engine ----------------------------------------------------------------------------------

def test_in_process_engine_backend(tmp_path, people, model_dir):
    from runtime.image_decode import decode_image
    from runtime.cascade.engine import Engine
    from runtime.cascade.settings import EngineSettings

    image = jpeg(8, (224, 224))
    engine = Engine.load(model_dir, dtype="float32", max_batch=1)
    expected = engine.predict([decode_image(image)])[0].prediction
    backend = EngineBackend(EngineSettings(model_dir, dtype="float32", quantize="none", max_batch=1))
    backend.warmup()
    with running_miner(tmp_path, people, backend) as m:
        answer, _ = asyncio.run(query(people.validators[5], m.axon.info(), b64(image)))
        bad, _ = asyncio.run(query(people.validators[5], m.axon.info(), b64(b"not an image")))
    assert answer.dendrite.status_code == 200 and answer.prediction == pytest.approx(expected, abs=1e-6)
    assert bad.dendrite.status_code == 400 and bad.dendrite.status_message.startswith("bad_image:")


# --- tests: parts ----------------------------------------------------------------------------------------------

def test_policy_refuses_unknown_hotkeys_without_raising(people):
    policy, view = people.policy(), people.view()
    assert policy.refusal(None, view) == "the request carries no hotkey"
    assert "first sync pending" in policy.refusal(people.validators[0].ss58_address, None)
    assert "not registered" in policy.refusal("5" + "x" * 47, view)
    assert policy.refusal(people.validators[0].ss58_address, view) is None
    assert policy.priority("5" + "x" * 47, view) == 0.0 and policy.priority(None, None) == 0.0
    assert AccessPolicy(force_validator_permit=False).refusal(people.no_permit.ss58_address, view) is None
    with pytest.raises(ValueError, match="both allowed and denied"):
        AccessPolicy(allow=frozenset({"a"}), deny=frozenset({"a"}))


def test_metagraph_sync_keeps_the_last_view_when_the_chain_fails():
    views = iter([MetagraphView.from_columns(["a"], [5.0], [True])])

    def source():
        view = next(views, None)
        if view is None:
            raise ConnectionError("chain unreachable")
        return view

    sync = MetagraphSync(source, interval_s=0.01, retry_s=0.01)
    sync.start()
    try:
        assert sync.wait_synced(5)
        give_up = time.monotonic() + 5
        while sync.failures < 3:
            assert time.monotonic() < give_up
            time.sleep(0.01)
        assert sync.view.get("a").stake == 5.0 and sync.age_s() > 0
    finally:
        sync.stop()


def test_static_metagraph_file(tmp_path, people):
    path = tmp_path / "metagraph.json"
    path.write_text(json.dumps([{"hotkey": "a", "stake": 3, "validator_permit": True}, {"hotkey": "b"}]))
    view = load_static(path)
    assert view.get("a").stake == 3.0 and view.get("b").uid == 1 and not view.get("b").validator_permit
    path.write_text(json.dumps([{"stake": 3}]))
    with pytest.raises(ValueError, match="neuron 0 needs a string 'hotkey'"):
        load_static(path)


def test_gate_admits_by_priority_and_gives_up_at_the_timeout():
    async def scenario():
        gate, order = PriorityGate(1), []
        await gate.acquire(0.0, 1.0)

        async def worker(priority):
            await gate.acquire(priority, 5.0)
            order.append(priority)
            gate.release()

        tasks = [asyncio.create_task(worker(p)) for p in (1.0, 5.0, 3.0, 5.0, 2.0)]
        await asyncio.sleep(0.01)
        assert gate.waiting == 5
        with pytest.raises(TimeoutError):
            await gate.acquire(100.0, 0.01)
        gate.release()
        await asyncio.gather(*tasks)
        return order, gate.running, gate.waiting

    assert asyncio.run(scenario()) == ([5.0, 5.0, 3.0, 2.0, 1.0], 0, 0)


def test_time_left_uses_the_signed_nonce_and_ignores_skewed_clocks():
    now = time.time_ns()
    synapse = ImageSynapse(timeout=9.0)
    synapse.dendrite.nonce = now - 2_000_000_000
    assert time_left_s(synapse, now) == pytest.approx(9.0 - 2.0 - 0.5)
    synapse.dendrite.nonce = now + 60_000_000_000  # the caller's clock runs a minute ahead
    assert time_left_s(synapse, now) == pytest.approx(8.5)
    assert time_left_s(ImageSynapse(timeout=2.0), now) == pytest.approx(1.8)


def test_importing_bittensor_leaves_other_loggers_alone():
    done = subprocess.run([sys.executable, "-c", (
        "import logging; logging.getLogger('server').setLevel(logging.INFO); "
        "h = logging.StreamHandler(); logging.getLogger('runtime').addHandler(h); "
        "import miner.bt; "
        "assert logging.getLogger('server').level == logging.INFO; "
        "assert logging.getLogger('runtime').handlers == [h]")], cwd=REPO, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr


def test_synapse_matches_the_subnets_wire_format():
    synapse = ImageSynapse(image="abc")
    assert synapse.prediction == -1.0 and synapse.testnet_label == -1 and synapse.deserialize() == -1.0
    assert ImageSynapse.required_hash_fields == ()  # see protocol.py: the validators hash no body field
    assert ImageSynapse.__name__ == "ImageSynapse"  # the Axon's route


# --- tests: the command line -----------------------------------------------------------------------------------

def run_miner_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def local_run_args(tmp_path: Path) -> list[str]:
    """A chainless miner command line (--no-serve, a static metagraph, a fresh wallet), all on loopback."""
    make_wallet(tmp_path / "wallets")
    static = tmp_path / "metagraph.json"
    static.write_text("[]")
    return ["--server-url", f"http://{LOOPBACK}:{free_port()}", "--no-serve", "--metagraph.static", str(static),
            "--wallet.name", "miner", "--wallet.hotkey", "default", "--wallet.path", str(tmp_path / "wallets"),
            "--axon.port", str(free_port()), "--bind-host", LOOPBACK, "--metrics-host", LOOPBACK,
            "--metrics-port", "-1"]


def offline_env() -> dict[str, str]:
    """Every HTTP(S) request of the child (bittensor's public-IP lookup asks through requests, urllib and curl) goes
    through a proxy on a closed loopback port: the lookup fails whether or not this machine reaches the internet."""
    closed = f"http://{LOOPBACK}:{free_port()}"
    env = {name: value for name, value in os.environ.items() if name.lower() != "no_proxy"}
    return env | {name: closed for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                            "ALL_PROXY")}


def startup_error(done: subprocess.CompletedProcess) -> str:
    """The one ERROR line of a failed start, once stderr is checked to hold no traceback."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_cli_help_and_usage_errors():
    done = run_miner_cli("--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--netuid", "--server-url", "--model", "--axon.port", "--wallet.name", "--wallet.hotkey",
                 "--subtensor.network", "--blacklist.min_stake", "--blacklist.allow", "--blacklist.deny",
                 "--blacklist.force_validator_permit", "--metagraph.static", "--no-serve", "--metrics-port",
                 "--logging.debug"):
        assert flag in done.stdout, flag
    neither = run_miner_cli("--no-serve")
    assert neither.returncode == 2 and "one of --server-url or --model" in neither.stderr


def test_cli_serves_a_dendrite_then_stops_on_sigterm(tmp_path, people, server_url):
    wallet = make_wallet(tmp_path / "wallets")
    static = tmp_path / "metagraph.json"
    static.write_text(json.dumps([{"hotkey": k.ss58_address, "stake": people.stakes[k.ss58_address],
                                   "validator_permit": True} for k in people.validators]))
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "miner", "--server-url", server_url, "--no-serve",
                             "--metagraph.static", str(static), "--wallet.name", "miner", "--wallet.hotkey", "default",
                             "--wallet.path", str(tmp_path / "wallets"), "--axon.port", str(port),
                             "--axon.external_ip", LOOPBACK, "--bind-host", LOOPBACK, "--metrics-host", LOOPBACK,
                             "--metrics-port", str(metrics_port)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        give_up = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(OSError, AssertionError):
                if metric(metrics_port, "roadwork_miner_metagraph_neurons") == 32:
                    break
            assert time.monotonic() < give_up, "the miner did not come up within 60 s"
            time.sleep(0.1)
        info = bt.AxonInfo(version=0, ip=LOOPBACK, port=port, ip_type=4, hotkey=wallet.hotkey.ss58_address,
                           coldkey=wallet.coldkeypub.ss58_address)
        image = jpeg(9, (224, 224))
        answer, _ = asyncio.run(query(people.validators[6], info, b64(image)))
        assert answer.dendrite.status_code == 200 and answer.prediction == server_prediction(server_url, image)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
        assert "axon listening" in log and "stopped" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def test_cli_without_a_public_ip_says_to_pass_axon_external_ip(tmp_path):
    done = run_miner_cli(*local_run_args(tmp_path), env=offline_env())
    error = startup_error(done)
    assert "public IP" in error and "pass it with --axon.external_ip" in error, error


def test_cli_startup_failures_name_the_flag_to_change(tmp_path):
    args = local_run_args(tmp_path) + ["--axon.external_ip", LOOPBACK]
    no_wallet = startup_error(run_miner_cli(*args, "--wallet.path", str(tmp_path / "nowhere")))
    assert "--wallet.name/--wallet.hotkey/--wallet.path" in no_wallet and "btcli wallet create" in no_wallet, \
        no_wallet
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = startup_error(run_miner_cli(*args, "--metrics-port", str(taken.getsockname()[1])))
    assert "Address already in use" in busy and "--metrics-port" in busy, busy


class RefusingSubtensor:
    """serve_axon answers a failure as each bittensor does: 9.x False, 10.x an ExtrinsicResponse (success False)."""

    def __init__(self, result) -> None:
        self.result = result

    def serve_axon(self, netuid, axon):
        return self.result


@pytest.mark.parametrize("result, reason", [(False, "no reason given"),
                                            (SimpleNamespace(success=False, message="NotRegistered"), "NotRegistered")])
def test_an_axon_the_chain_did_not_publish_fails_the_start(tmp_path, people, result, reason):
    miner = Miner(make_wallet(tmp_path), ServerBackend(f"http://{LOOPBACK}:{free_port()}"),
                  MetagraphSync(people.view, interval_s=3600), people.policy(),
                  AxonSettings(port=free_port(), bind_host=LOOPBACK, external_ip=LOOPBACK))
    try:
        with pytest.raises(RuntimeError, match=rf"not publish the axon on netuid 72 \({reason}\).*btcli subnet"):
            miner.start(RefusingSubtensor(result), 72)
    finally:
        miner.stop()
