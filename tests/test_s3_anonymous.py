"""Public buckets as the seed's markets use them (`s3://nos-ai-models-…/…`): a bucket marked
`anonymous = true` is read with unsigned requests, so neither the section's keys nor the node's own
AWS credentials are ever shown to a bucket someone else owns. moto is the S3 endpoint; a forwarding
recorder in front of it (tests/servers/forwarder.py) keeps every request's headers."""

from __future__ import annotations

import os

import httpx
import pytest

from proxy.config import ConfigError, load_settings
from tests.servers.forwarder import Forwarder
from tests.servers.moto import MotoS3


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
    recorder = Forwarder(s3.url)
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
