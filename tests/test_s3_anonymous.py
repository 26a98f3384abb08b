"""Public buckets as the seed's markets use them (`s3://nos-ai-models-…/…`): a bucket marked
`anonymous = true` is read with unsigned requests, so neither the section's keys nor the node's own
AWS credentials are ever shown to a bucket someone else owns. moto is the S3 endpoint; a forwarding
recorder in front of it keeps every request's headers."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from proxy.config import ConfigError, load_settings
from tests.servers.moto import MotoS3


class HeaderRecorder(ThreadingHTTPServer):
    """Forwards every request to `target` and records (method, path, headers)."""

    def __init__(self, target: str) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                recorder.seen.append((self.command, self.path, headers))
                length = int(headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = httpx.request(self.command, target + self.path, headers={
                    k: v for k, v in headers.items() if k not in ("host", "connection")}, content=body, timeout=60)
                self.send_response(upstream.status_code)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                        self.send_header(name, value)
                payload = upstream.content if self.command != "HEAD" else b""
                length = upstream.headers.get("content-length", "0") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def s3():  # type: ignore[no-untyped-def]
    server = MotoS3.start()
    client = server.client()
    client.create_bucket(Bucket="public-models", ACL="public-read")  # moto refuses unsigned reads otherwise
    client.create_bucket(Bucket="own-models")
    yield server
    server.stop()


def test_an_anonymous_bucket_is_read_unsigned_and_no_key_reaches_it(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    public, own = os.urandom(300_000), os.urandom(200_000)
    s3.client().put_object(Bucket="public-models", Key="stable-diffusion/dreamshaper/8/unet.bin", Body=public, ACL="public-read")
    s3.client().put_object(Bucket="own-models", Key="weights.bin", Body=own)
    recorder = HeaderRecorder(s3.url)
    try:
        pt = pullthrough(
            s3={"endpoint_url": recorder.url, "region": "us-east-1", "access_key_id": "section-key",
                "secret_access_key": "section-secret",
                "buckets": [{"name": "public-models", "anonymous": True}, {"name": "own-models"}]},
            # the node's own credentials, as an instance role or a mounted profile would give them
            env={"AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": "node-secret"},
        )
        got = httpx.get(f"{pt.url}/s3/public-models/stable-diffusion/dreamshaper/8/unet.bin", timeout=60)
        assert got.status_code == 200 and got.content == public
        to_public = [(m, p, h) for m, p, h in recorder.seen if p.startswith("/public-models/")]
        assert to_public, "the public bucket was not asked"
        for method, path, headers in to_public:
            shown = " ".join([path, *headers.values()])
            assert "authorization" not in headers and "x-amz-security-token" not in headers, (method, path)
            assert "section-key" not in shown and "node-key" not in shown and "Credential=" not in path
        # The control: the recorder does see signatures, on the bucket that is not anonymous.
        assert httpx.get(f"{pt.url}/s3/own-models/weights.bin", timeout=60).content == own
        to_own = [h for _, p, h in recorder.seen if p.startswith("/own-models/")]
        assert to_own and all("Credential=section-key/" in h.get("authorization", "") for h in to_own)
    finally:
        recorder.shutdown()


def test_an_anonymous_bucket_takes_no_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.toml"
    config.write_text('[s3]\nbuckets = [{ name = "public", anonymous = true, access_key_id_env = "KEY" }]\n')
    with pytest.raises(ConfigError, match=r"^s3\.buckets\.0: .*anonymous bucket takes no keys"):
        load_settings(config)
