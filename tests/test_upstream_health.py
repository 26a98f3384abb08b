"""Upstream failures an operator can alert on: each kind (DNS, refused, TLS, timeout, HTTP status)
named in the client's error, counted per failed attempt in /metrics, and logged once when the
upstream goes down and once when it comes back; retries with jitter and Retry-After."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from tenacity import AsyncRetrying, RetryCallState

from proxy.http.download import ATTEMPTS, BlobTransport, RetryableAnswer, TransferFailed, WaitRetryAfter, check_retryable
from proxy.upstreams import UpstreamHealth, classify
from tests.conftest import require_tool
from tests.servers.ports import free_port
from tests.servers.registry import Distribution
from tests.servers.scripted import HANG, ScriptedUpstream, always

MANIFEST_UNKNOWN = (404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}')
REQUESTS = 3  # failing requests per upstream: one "down" line for all of them


def wait_until(condition, timeout: float = 30.0, message: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.02)


def metric(base_url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


# -- through the mirror ---------------------------------------------------------------------------

@pytest.fixture
def broken():  # type: ignore[no-untyped-def]
    """One upstream per kind of failure: the fakes count what reached them."""
    fakes = {
        "unavailable": ScriptedUpstream(always(503)),
        "hung": ScriptedUpstream(lambda method, path: HANG),
        "plain": ScriptedUpstream(always(200)),  # spoken to in TLS, it answers in plain HTTP
    }
    yield fakes
    for fake in fakes.values():
        fake.close()


def test_each_kind_of_upstream_failure_is_named_counted_and_logged_once_until_it_comes_back(broken, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_tool("docker-registry")
    closed = free_port()
    cases = {  # registry name: (url, kind, what the client's message says)
        "dns.test": ("http://nonexistent.invalid:5000", "dns", "dns.test unreachable: DNS lookup failed"),
        "refused.test": (f"http://127.0.0.1:{closed}", "refused", "refused.test unreachable: connection refused"),
        "unavailable.test": (broken["unavailable"].url, "http_503", "unavailable.test answered 503"),
        "tls.test": (f"https://127.0.0.1:{broken['plain'].port}", "tls", "tls.test unreachable: TLS handshake failed"),
        "timeout.test": (broken["hung"].url, "timeout", "timeout.test unreachable: read timed out"),
    }
    pt = pullthrough([{"name": name, "url": url} for name, (url, _, _) in cases.items()], upstream_timeout="1s")

    def pull_failing(name: str) -> list[httpx.Response]:
        return [httpx.get(f"{pt.url}/v2/{name}/library/app/manifests/{n}", timeout=60) for n in range(REQUESTS)]

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = dict(zip(cases, pool.map(pull_failing, cases)))

    log = pt.log_text()
    for name, (_, kind, message) in cases.items():
        for response in answers[name]:
            assert response.status_code == 503, (name, response.text)
            error = response.json()["errors"][0]
            assert error["code"] == "UNAVAILABLE" and message in error["message"], (name, error)
        assert len(lines_with(log, f"upstream oci:{name} down: {kind}: ")) == 1, (name, lines_with(log, f"oci:{name}"))
        assert metric(pt.url, "pullthrough_upstream_errors_total", upstream=f"oci:{name}", kind=kind) == ATTEMPTS * REQUESTS, name
        assert metric(pt.url, "pullthrough_upstream_up", upstream=f"oci:{name}") == 0, name
    # What the fakes saw is what was counted: every attempt, each retry included.
    assert len(broken["unavailable"].seen) == len(broken["hung"].seen) == ATTEMPTS * REQUESTS

    # Back: a real registry where the connection was refused, the fake answering where it said 503.
    registry = Distribution.start(tmp_path / "back", port=closed)
    try:
        broken["unavailable"].script = lambda method, path: MANIFEST_UNKNOWN
        for name in ("refused.test", "unavailable.test"):
            for _ in range(2):
                response = httpx.get(f"{pt.url}/v2/{name}/library/app/manifests/1", timeout=60)
                assert response.status_code == 404 and response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
            assert len(lines_with(pt.log_text(), f"upstream oci:{name} up again after ")) == 1, name
            assert metric(pt.url, "pullthrough_upstream_up", upstream=f"oci:{name}") == 1, name
        assert metric(pt.url, "pullthrough_upstream_up", upstream="oci:dns.test") == 0
        assert len(lines_with(pt.log_text(), " down: ")) == len(cases)
    finally:
        registry.stop()


def test_hub_s3_web_and_ipfs_failures_are_named_counted_and_logged_once_each(pullthrough) -> None:  # type: ignore[no-untyped-def]
    from multiformats import CID, multihash

    hub, s3, origin, gateway = (free_port() for _ in range(4))  # nothing listens on any of them
    pt = pullthrough(
        [], hf={"url": f"http://127.0.0.1:{hub}"},
        s3={"endpoint_url": f"http://127.0.0.1:{s3}", "access_key_id": "id", "secret_access_key": "secret", "buckets": [{"name": "models"}]},
        web={"allow": [f"http://127.0.0.1:{origin}/"], "ipfs_gateways": [f"http://127.0.0.1:{gateway}"]},
    )
    cid = CID("base32", 1, "raw", multihash.digest(b"weights", "sha2-256"))
    paths = {
        f"hf:127.0.0.1:{hub}": "/org/model/resolve/main/config.json",
        f"s3:127.0.0.1:{s3}": "/s3/models/weights.bin",
        f"web:127.0.0.1:{origin}": f"/web/http://127.0.0.1:{origin}/weights.bin",
        f"ipfs:127.0.0.1:{gateway}": f"/ipfs/{cid}",
    }
    for upstream, path in paths.items():
        for _ in range(2):
            response = httpx.get(f"{pt.url}{path}", timeout=60)
            assert response.status_code == 503, (upstream, response.status_code, response.text)
            assert "connection refused" in response.text, (upstream, response.text)
        log = pt.log_text()
        assert len(lines_with(log, f"upstream {upstream} down: refused: ")) == 1, (upstream, log)
        assert metric(pt.url, "pullthrough_upstream_errors_total", upstream=upstream, kind="refused"), upstream
        assert metric(pt.url, "pullthrough_upstream_up", upstream=upstream) == 0, upstream
    # The Hub's failed request was tried ATTEMPTS times; the next one failed at once (its outage
    # window), without reaching it. S3 counts requests (botocore retries inside one), web and IPFS
    # are not retried (a cached copy or the next gateway answers instead).
    assert metric(pt.url, "pullthrough_upstream_errors_total", upstream=f"hf:127.0.0.1:{hub}", kind="refused") == ATTEMPTS
    for upstream in list(paths)[1:]:
        assert metric(pt.url, "pullthrough_upstream_errors_total", upstream=upstream, kind="refused") == 2, upstream


def test_a_429_with_retry_after_is_retried_once_the_named_wait_has_passed(pullthrough) -> None:  # type: ignore[no-untyped-def]
    body = os.urandom(64 * 1024)
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    limited = iter([(429, {"Retry-After": "1", "Content-Type": "application/json"},
                     b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}')])

    def script(method: str, path: str):  # type: ignore[no-untyped-def]
        if path.endswith(digest):
            return next(limited, (200, {"Content-Type": "application/octet-stream"}, body))
        return MANIFEST_UNKNOWN

    upstream = ScriptedUpstream(script)
    try:
        pt = pullthrough([{"name": "docker.io", "url": upstream.url, "default": True}])
        response = httpx.get(f"{pt.url}/v2/library/limited/blobs/{digest}", timeout=60)
        assert response.status_code == 200 and response.content == body
        first, second = [at for at, _, _ in upstream.requests(digest)]
        assert second - first >= 1.0, f"retried {second - first:.2f} s after a 429 that said Retry-After: 1"
        assert metric(pt.url, "pullthrough_upstream_errors_total", upstream="oci:docker.io", kind="http_429") == 1
        assert metric(pt.url, "pullthrough_upstream_up", upstream="oci:docker.io") == 1
        assert lines_with(pt.log_text(), "upstream oci:docker.io down") == []  # the retry succeeded: never down
    finally:
        upstream.close()


# -- the parts on their own -----------------------------------------------------------------------

def _state(attempt: int, error: BaseException | None = None) -> RetryCallState:
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    if error is not None:
        state.set_exception((type(error), error, None))
    return state


def test_backoff_between_attempts_has_jitter_and_grows() -> None:
    wait = WaitRetryAfter()
    first = [wait(_state(1)) for _ in range(50)]
    second = [wait(_state(2)) for _ in range(50)]
    assert len(set(first)) > 1 and len(set(second)) > 1, "every client would retry in step"
    assert all(0.2 <= w <= 0.5 for w in first) and all(1.0 <= w <= 1.3 for w in second), (first, second)


def test_retry_after_is_waited_for_up_to_the_cap_and_beyond_it_not_retried() -> None:
    wait = WaitRetryAfter()
    waits = [wait(_state(1, RetryableAnswer(429, 3.0))) for _ in range(50)]
    assert all(3.0 <= w <= 3.25 for w in waits), waits  # the named wait, and a little jitter on top
    assert len(set(waits)) > 1, "a fleet told the same Retry-After would come back in the same instant"
    with pytest.raises(RetryableAnswer):
        check_retryable(429, {"Retry-After": "5"})
    check_retryable(429, {})  # a rate limit that names no wait is the upstream's answer: passed on
    check_retryable(503, {"Retry-After": "3600"})  # an hour: the client hears it now, not in 10 s
    check_retryable(404, {"Retry-After": "1"})
    with pytest.raises(RetryableAnswer) as raised:
        check_retryable(503, {"Retry-After": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 4))})
    assert raised.value.retry_after is not None and 2.0 <= raised.value.retry_after <= 4.0


@pytest.fixture(scope="module")
def endpoints():  # type: ignore[no-untyped-def]
    """Local sockets that fail in each way: a closed port, a plain-HTTP server, one that never
    answers and one that closes each connection once the request arrived."""

    class Plain(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    plain = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    silent, closing = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    def close_each() -> None:
        while True:
            try:
                connection = closing.accept()[0]
            except OSError:
                return
            connection.recv(1024)
            connection.close()

    for target in (plain.serve_forever, hold, close_each):
        threading.Thread(target=target, daemon=True).start()
    yield {
        "dns": "http://nonexistent.invalid:5000/v2/",
        "refused": f"http://127.0.0.1:{free_port()}/v2/",
        "tls": f"https://127.0.0.1:{plain.server_address[1]}/v2/",
        "timeout": f"http://127.0.0.1:{silent.getsockname()[1]}/v2/",
        "reset": f"http://127.0.0.1:{closing.getsockname()[1]}/v2/",
    }
    plain.shutdown()
    plain.server_close()
    for sock in (silent, closing, *held):
        sock.close()


@pytest.mark.parametrize("kind", ["dns", "refused", "tls", "timeout", "reset"])
def test_failures_are_classified_from_the_exception_chain_of_both_transports(kind, endpoints) -> None:  # type: ignore[no-untyped-def]
    url = endpoints[kind]

    async def failures() -> tuple[BaseException, BaseException]:
        async with httpx.AsyncClient(timeout=1.0) as client:
            try:
                await client.get(url)
            except httpx.TransportError as exc:
                through_httpx: BaseException = exc
        transport = BlobTransport("test", timeout=urllib3.Timeout(connect=1.0, read=1.0))
        try:
            await transport.open(url, None)
        except TransferFailed as exc:
            through_urllib3: BaseException = exc
        transport.close()
        return through_httpx, through_urllib3

    for error in asyncio.run(failures()):
        failure = classify(error)
        assert failure.kind == kind, (error, failure)
        assert "127.0.0.1" not in failure.summary and "/v2/" not in failure.summary


def test_health_logs_only_changes_of_state(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "proxy.upstreams")
    now = [100.0]
    health = UpstreamHealth(clock=lambda: now[0])
    failure = classify(ConnectionRefusedError(111, "Connection refused"))
    for _ in range(3):
        health.gave_up("web:example.test", failure)
    now[0] += 12.34
    health.answered("web:example.test")
    health.answered("web:example.test")
    health.status("web:example.test", 404)  # an answer, not a failure
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.upstreams"]
    assert messages == ["upstream web:example.test down: refused: Connection refused",
                        "upstream web:example.test up again after 12.3 s"], json.dumps(messages)
