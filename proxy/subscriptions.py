"""A resource set's subscription: the market's published listing of required resources.

The listing is JSON in the seed's shape, `{"required_images": [...], "required_remote_resources":
[{"type": "S3", "url": "s3://..."}, ...]}` (a pullthrough's own listing endpoint answers the same
shape, so one node may follow another's). It is read with conditional requests (the ETag and
Last-Modified of the last good answer); the last good listing is saved in the index, so a restart
while the URL fails, or an air-gapped node, still knows what its set holds.

A listing that is not JSON, or not an object with those lists, is refused whole and the last good
one is kept; an entry that names nothing pullthrough can fetch (an unknown type, a missing URL) is
reported on its own and the others are taken.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from proxy.config import RemoteResource, ResourceSet
from proxy.resources import ResourceError, parse_resource
from proxy.store.records import Reference
from proxy.store.references import References

log = logging.getLogger(__name__)

LISTINGS = "set-listing"  # the index's references: one per subscribed set, the last good listing
MAX_LISTING_BYTES = 4 * 1024 * 1024  # thousands of entries; more is not a market's listing
MAX_ENTRY_ERRORS = 100
LISTING_TIMEOUT = 60.0  # a whole read, however slowly the dashboard trickles
_REMOTE_FIELD = {"S3": "url", "HTTPS": "url", "HF": "repo", "IPFS": "cid"}


class ListingError(Exception):
    """The listing as a whole cannot be read: the last good one is kept."""


@dataclass(frozen=True)
class EntryError:
    """One entry of a listing that names nothing pullthrough can fetch, and why."""

    entry: str  # as the listing has it, shortened
    error: str

    def as_json(self) -> dict[str, str]:
        return {"entry": self.entry, "error": self.error}


@dataclass(frozen=True)
class Listing:
    """What a subscribed listing names, in its order, without repeats."""

    images: tuple[str, ...] = ()
    remote: tuple[RemoteResource, ...] = ()
    errors: tuple[EntryError, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "images": list(self.images),
            "remote": [r.model_dump(exclude_defaults=True) for r in self.remote],
            "errors": [e.as_json() for e in self.errors],
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Listing:
        return cls(
            tuple(saved.get("images", ())),
            tuple(RemoteResource.model_validate(r) for r in saved.get("remote", ())),
            tuple(EntryError(**e) for e in saved.get("errors", ())),
        )


def parse_listing(body: bytes) -> Listing:
    """The entries of a listing; ListingError when it is not a listing at all."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ListingError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not ({"required_images", "required_remote_resources"} & document.keys()):
        raise ListingError("not a listing: a JSON object with required_images and required_remote_resources")
    images_in, remote_in = document.get("required_images", []), document.get("required_remote_resources", [])
    if not isinstance(images_in, list) or not isinstance(remote_in, list):
        raise ListingError("required_images and required_remote_resources must be lists")
    images: dict[str, None] = {}
    remote: dict[str, RemoteResource] = {}
    errors: list[EntryError] = []
    for entry in images_in:
        if isinstance(entry, str) and entry.strip() and len(entry) <= 1024:
            images[entry.strip()] = None
        else:
            errors.append(EntryError(_shown(entry), "an image is a name such as docker.io/library/alpine:3.20"))
    for entry in remote_in:
        try:
            resource = remote_resource(entry)
        except ResourceError as exc:
            errors.append(EntryError(_shown(entry), str(exc)))
        else:
            remote.setdefault(resource.display_url, resource)
    return Listing(tuple(images), tuple(remote.values()), tuple(errors[:MAX_ENTRY_ERRORS]))


def remote_resource(entry: object) -> RemoteResource:
    """One `required_remote_resources` entry: `{"type": "S3", "url": "s3://…"}`, HTTPS with a URL, HF
    with `repo` (or an hf:// URL), IPFS with `cid` (or an ipfs:// URL). Fields pullthrough does
    not read are ignored (a market may add its own)."""
    if not isinstance(entry, dict):
        raise ResourceError("a remote resource is an object with a type and a url")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind.upper() not in _REMOTE_FIELD:
        raise ResourceError(f"unknown type {str(kind)[:40]!r} (S3, HTTPS, HF or IPFS)")
    kind = kind.upper()
    fields: dict[str, Any] = {k: v for k, v in entry.items() if k in RemoteResource.model_fields and k != "type"}
    url = fields.get("url")
    if kind in ("HF", "IPFS") and isinstance(url, str) and not fields.get(_REMOTE_FIELD[kind]):
        parsed = parse_resource(url)
        if parsed.kind != kind.lower():
            raise ResourceError(f"{url[:200]}: not an {kind} URL")
        fields.pop("url")
        if kind == "HF":
            fields.update(repo=parsed.repo_id, repo_type=parsed.repo_type, revision=parsed.revision)
        else:
            fields["cid"] = parsed.url
    if kind in ("S3", "HTTPS") and isinstance(url, str):
        parse_resource(url)  # a URL pullthrough reads (no spaces, control characters, unknown schemes)
    if kind == "S3" and isinstance(url, str) and url.startswith("s3://"):
        _check_s3_url(url)
    try:
        return RemoteResource(type=kind, **fields)
    except ValidationError as exc:
        raise ResourceError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


def _check_s3_url(url: str) -> None:
    """A listed S3 URL names an object or a prefix: never a whole bucket (the listing would lend
    every key of it), no empty or dot segments."""
    _, _, key = url.removeprefix("s3://").partition("/")
    parts = key.removesuffix("/").split("/")
    if not key.strip("/") or any(part in ("", ".", "..") for part in parts):
        raise ResourceError(f"{url[:200]}: a listed S3 URL names an object or a prefix (s3://bucket/key or s3://bucket/prefix/), not a whole bucket")


def _shown(entry: object) -> str:
    text = json.dumps(entry) if not isinstance(entry, str) else entry
    return text if len(text) <= 200 else text[:200] + "…"


@dataclass
class Subscription:
    """One set's listing URL: the last good listing, and how the last attempts went."""

    resource_set: ResourceSet
    refs: References
    http: httpx.AsyncClient
    offline: bool = False
    listing: Listing | None = None
    validators: dict[str, str] = field(default_factory=dict)
    updated_at: float | None = None  # the last good answer (200 or 304)
    checked_at: float | None = None  # the last attempt
    error: str | None = None  # of the last attempt; the last good listing is in use meanwhile

    @property
    def url(self) -> str:
        assert self.resource_set.url is not None
        return self.resource_set.url

    @property
    def _url_key(self) -> str:
        """The URL as the index keeps it: hashed (a signed URL's query is a credential)."""
        return hashlib.sha256(self.url.encode()).hexdigest()

    async def load(self) -> None:
        """The listing saved by the last good read (by any node sharing the index), if any."""
        if self.listing is None:
            await self._adopt_saved()

    async def _adopt_saved(self) -> bool:
        """Take the saved listing when it is newer than ours (another node read it since); whether
        the listing changed. One this version cannot read counts as none."""
        try:
            saved = await self.refs.get(LISTINGS, self.resource_set.name)
            if saved is None or saved.meta.get("url") != self._url_key or saved.fetched_at <= (self.updated_at or 0):
                return False
            listing = Listing.from_json(dict(saved.meta["listing"]))
        except Exception as exc:  # noqa: BLE001 - a newer version's listing, an index away: read the URL instead
            log.warning("resource set %s: the saved listing cannot be used: %s", self.resource_set.name, exc)
            return False
        changed = listing != self.listing
        self.listing, self.validators, self.updated_at = listing, dict(saved.validators), saved.fetched_at
        return changed

    async def refresh(self) -> bool:
        """Read the listing again; whether it changed. Failures are kept in `error`, never raised."""
        changed = False
        try:
            changed = await self._read()
        finally:
            self.checked_at = time.time()
        return changed

    async def _read(self) -> bool:
        await self.load()
        if self.offline:
            self.error = "offline: the listing was not read (the saved one is used)"
            return False
        try:
            listing, validators = await asyncio.wait_for(self._fetch(), LISTING_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the last good listing, and says why
            self.error = f"{self._url_for_log()}: {_cause(exc)}"
            log.warning("resource set %s: the listing could not be read, the last good one is kept: %s",
                        self.resource_set.name, self.error)
            return await self._adopt_saved()  # another node of the fleet may have read it
        self.error = None
        self.updated_at = time.time()
        if listing is None:  # 304: unchanged
            return False
        changed = listing != self.listing
        self.listing, self.validators = listing, validators
        await self._save()
        if listing.errors:
            log.warning("resource set %s: %d entries of the listing name nothing fetchable (the rest are taken): %s",
                        self.resource_set.name, len(listing.errors), "; ".join(f"{e.entry}: {e.error}" for e in listing.errors[:3]))
        return changed

    async def _fetch(self) -> tuple[Listing | None, dict[str, str]]:
        """The listing and its validators, or None when the server says it has not changed."""
        headers = {"Accept": "application/json"}
        if self.listing is not None:
            if etag := self.validators.get("etag"):
                headers["If-None-Match"] = etag
            if modified := self.validators.get("last_modified"):
                headers["If-Modified-Since"] = modified
        async with self.http.stream("GET", self.url, headers=headers, follow_redirects=True) as response:
            if response.status_code == 304 and self.listing is not None:
                return None, self.validators
            if response.status_code != 200:
                raise ListingError(f"answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    raise ListingError(f"larger than {MAX_LISTING_BYTES} bytes")
            validators = {k: response.headers[h] for k, h in (("etag", "ETag"), ("last_modified", "Last-Modified")) if h in response.headers}
        return parse_listing(bytes(body)), validators

    async def _save(self) -> None:
        assert self.listing is not None
        document = self.listing.as_json()
        digest = "sha256:" + hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        try:
            await self.refs.put(Reference(
                LISTINGS, self.resource_set.name, digest, self.updated_at or time.time(), 0.0, self.validators,
                {"url": self._url_key, "listing": document},
            ))
        except Exception as exc:  # noqa: BLE001 - the listing is in use in memory; saving is for the next start
            log.warning("resource set %s: cannot save the listing: %s", self.resource_set.name, exc)

    def _url_for_log(self) -> str:
        """The URL without its query (a signed URL's signature is a credential)."""
        return self.url.split("?", 1)[0]

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self._url_for_log(),
            "refresh": self.resource_set.refresh,
            "updated_at": self.updated_at,
            "checked_at": self.checked_at,
            "error": self.error,
            "stale": self.error is not None and self.listing is not None,  # the last good listing is in use
            "entry_errors": [e.as_json() for e in self.listing.errors] if self.listing else [],
        }


def _cause(exc: BaseException) -> str:
    """What went wrong, in a few words: the exception's own message or its type."""
    if isinstance(exc, TimeoutError):
        return f"no whole answer within {LISTING_TIMEOUT:.0f} s"
    if isinstance(exc, httpx.HTTPError):
        inner = exc.__context__ or exc.__cause__
        detail = str(exc) or (str(inner) if inner else "") or type(exc).__name__
        return f"{type(exc).__name__}: {detail}"[:300]
    return (str(exc) or type(exc).__name__)[:300]
