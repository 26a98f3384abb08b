"""aioboto3 clients, one per configured bucket, and the three calls the mirror makes.

Errors become ObjectErrors in the mirror's shape: a missing key is 404 NoSuchKey, a refused
request 403, an unreachable endpoint 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aioboto3
import botocore.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from proxy.config import S3Bucket, S3Config
from proxy.http.offline import MESSAGE as OFFLINE
from proxy.sources.objects import ObjectError, Unreachable
from proxy.upstreams import UpstreamHealth, classify, status_failure

MAX_LISTED = 100_000  # a listing is held whole (and cached): a model's folder, not a bucket of millions
_CLIENT_CONFIG = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
_ANONYMOUS_CONFIG = _CLIENT_CONFIG.merge(Config(signature_version=UNSIGNED))  # public buckets: no signature, no key


class S3Body:
    """A GetObject body (an async upstream body for the store)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self._body = response["Body"]
        self.size: int | None = response.get("ContentLength")

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body.iter_chunks(1024 * 1024):
                yield chunk
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Unreachable(f"S3 transfer broke off: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        self._body.close()


class S3Clients:
    """Long-lived clients per bucket (a client per request would cost a TLS handshake each)."""

    def __init__(self, config: S3Config, health: UpstreamHealth | None = None, *, offline: bool = False) -> None:
        self._config = config
        self._offline = offline  # offline = true: no client is made, every call is refused
        self._health = health or UpstreamHealth()
        for bucket in config.buckets:
            self._health.watch(self.upstream(bucket))
        self._session = aioboto3.Session()
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[tuple[str, bool], Any] = {}

    async def client(self, bucket: S3Bucket) -> Any:
        """The bucket's client: the one way to the endpoint, so that offline it is refused here."""
        if self._offline:
            raise Unreachable(f"{OFFLINE}; s3://{bucket.name} was not asked")
        key = (bucket.name, bucket.anonymous)  # a listed bucket may be asked both ways (routes.py)
        if key not in self._clients:
            config = _ANONYMOUS_CONFIG if bucket.anonymous else _CLIENT_CONFIG
            client = self._session.client("s3", config=config, **self._config.credentials(bucket))
            self._clients[key] = await self._stack.enter_async_context(client)
        return self._clients[key]

    async def aclose(self) -> None:
        await self._stack.aclose()

    def upstream(self, bucket: S3Bucket) -> str:
        """The bucket's endpoint as metrics and log lines name it: "s3:minio.local:9000", "s3:aws"."""
        endpoint = bucket.endpoint_url or self._config.endpoint_url
        return f"s3:{urlsplit(endpoint).netloc.rpartition('@')[2] if endpoint else 'aws'}"

    @contextlib.contextmanager
    def _errors(self, bucket: S3Bucket, key: str) -> Any:
        """botocore's errors as the mirror's, and the endpoint's health (botocore retried already)."""
        upstream = self.upstream(bucket)
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 502))
            failure = status_failure(status)
            if failure is None:
                self._health.answered(upstream)
            else:
                self._health.gave_up(upstream, failure)
            raise _client_error(exc, status, bucket.name, key) from None
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
            raise ObjectError(403, "AccessDenied", f"no credentials to read s3://{bucket.name}/{key}") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.SSLError,
                botocore.exceptions.ConnectionClosedError, OSError) as exc:
            failure = self._health.gave_up(upstream, classify(exc))
            raise Unreachable(f"the S3 endpoint is unreachable: {failure.summary}") from None
        else:
            self._health.answered(upstream)

    async def head(self, bucket: S3Bucket, key: str) -> dict[str, Any]:
        client = await self.client(bucket)
        with self._errors(bucket, key):
            return await client.head_object(Bucket=bucket.name, Key=key)

    async def get(self, bucket: S3Bucket, key: str, etag: str) -> S3Body:
        """The object's body, only if it is still the version `etag` names (parts never mix versions)."""
        client = await self.client(bucket)
        with self._errors(bucket, key):
            return S3Body(await client.get_object(Bucket=bucket.name, Key=key, IfMatch=etag))

    async def list(self, bucket: S3Bucket, prefix: str) -> list[dict[str, Any]]:
        client = await self.client(bucket)
        objects: list[dict[str, Any]] = []
        with self._errors(bucket, prefix):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket.name, Prefix=prefix):
                for item in page.get("Contents", []):
                    objects.append(
                        {"key": item["Key"], "size": item["Size"], "etag": item.get("ETag", ""),
                         "last_modified": item["LastModified"].isoformat()}
                    )
                if len(objects) > MAX_LISTED:
                    raise ObjectError(413, "TooManyObjects", f"s3://{bucket.name}/{prefix} holds more than {MAX_LISTED} objects: name a narrower prefix")
        return objects


def _client_error(exc: botocore.exceptions.ClientError, status: int, bucket: str, key: str) -> ObjectError:
    code = str(exc.response.get("Error", {}).get("Code", "Error"))
    if status in (404,) or code in ("NoSuchKey", "NotFound", "404"):
        return ObjectError(404, "NoSuchKey", f"s3://{bucket}/{key} does not exist")
    if status == 412:
        return ObjectError(409, "VersionChanged", f"s3://{bucket}/{key} changed while it was being fetched")
    if status in (401, 403):
        return ObjectError(403, "AccessDenied", f"the endpoint refused access to s3://{bucket}/{key}")
    if status >= 500:
        return Unreachable(f"the S3 endpoint answered {status} for s3://{bucket}/{key}")
    return ObjectError(502, code, f"the S3 endpoint answered {status} {code}")
