"""The bundle's JSON (`pullthrough-bundle.json`): written from what the index holds for a set, and
read back with every field checked, so that a bundle names nothing outside its own blobs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from proxy.resources import ResourceError, parse_resource
from proxy.store.digest import Digest
from proxy.store.index.sets import admissible, named_hashes
from proxy.store.records import BlobRecord, ReadScope, Reference, SetContents

FORMAT = "pullthrough-bundle"
VERSION = 1
MANIFEST = "pullthrough-bundle.json"
CHECKSUM = "pullthrough-bundle.json.sha256"  # the last member: the JSON's digest, which nothing else covers
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class BadBundle(ValueError):
    """A bundle this node refuses (or cannot read), worded for one line; nothing was imported."""


def build(listing: Mapping[str, Any], contents: SetContents, sizes: Mapping[str, int]) -> bytes:
    blobs = []
    for digest in contents.digests:
        record = contents.records.get(digest)
        blobs.append({"digest": digest, "size": sizes[digest], "media_type": record.media_type if record else None,
                      "source": record.source if record else None, "upstream": record.upstream if record else None,
                      "scopes": list(contents.scopes.get(digest, []))})
    references = [{"source": r.source, "key": r.key, "digest": r.digest, "fetched_at": r.fetched_at, "expires_at": r.expires_at,
                   "validators": dict(r.validators), "meta": dict(r.meta)} for r in contents.references]
    document = {"format": FORMAT, "version": VERSION, "set": contents.name, "created_at": int(time.time()),
                "listing": listing, "blobs": blobs, "references": references}
    return json.dumps(document, sort_keys=True).encode()


def blob_member(digest: str) -> str:
    """Where a blob stands in the tar: blobs/sha256/<hex>, as in an OCI image layout."""
    return "blobs/" + digest.replace(":", "/", 1)


def checksum(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def parse(data: bytes) -> tuple[dict[str, Any], SetContents]:
    """The listing and the set's rows a bundle's JSON holds; BadBundle for anything amiss."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise BadBundle(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BadBundle(f"not a pullthrough bundle: {MANIFEST} names no format {FORMAT!r}")
    if document.get("version") != VERSION:
        raise BadBundle(f"bundle format version {document.get('version')!r}: this pullthrough reads version {VERSION}")
    name = _text(document, "set", 255)
    listing = _listing(document.get("listing"), name)
    records, scopes = _blobs(document.get("blobs"))
    scope_names = {ReadScope(s).name for found in scopes.values() for s in found}
    references = _references(document.get("references"), set(records), scope_names)
    return listing, SetContents(name, list(records), records, scopes, references)


def _listing(listing: object, name: str) -> dict[str, Any]:
    if not isinstance(listing, dict) or listing.get("name") != name:
        raise BadBundle(f"the bundle's listing is not the listing of {name!r}")
    images, remote = listing.get("required_images"), listing.get("required_remote_resources")
    if not isinstance(images, list) or not isinstance(remote, list) or not all(isinstance(r, dict) for r in remote):
        raise BadBundle("the bundle's listing lacks required_images or required_remote_resources")
    for text in [*images, *(r.get("url") for r in remote)]:
        try:
            parse_resource(text if isinstance(text, str) else "")
        except ResourceError as exc:
            raise BadBundle(f"the bundle's listing: {exc}") from None
    return listing


def _blobs(entries: object) -> tuple[dict[str, BlobRecord], dict[str, list[str]]]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadBundle(f"{MANIFEST} lists no blobs")
    records: dict[str, BlobRecord] = {}
    scopes: dict[str, list[str]] = {}
    for entry in entries:
        try:
            digest = str(Digest.parse(entry.get("digest")))
            admitted = [str(ReadScope(s)) for s in entry.get("scopes", [])]
        except (ValueError, TypeError):
            raise BadBundle(f"{MANIFEST}: {str(entry.get('digest'))[:80]!r}: not a sha256 digest with read scopes") from None
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadBundle(f"{digest}: no size in {MANIFEST}")
        if digest in records:
            raise BadBundle(f"{digest} is listed twice in {MANIFEST}")
        records[digest] = BlobRecord(digest, size, _optional(entry, "media_type", 255), 0.0, 0.0, 0,
                                     _optional(entry, "source", 16), _optional(entry, "upstream", 255))
        scopes[digest] = admitted
    return records, scopes


def _references(entries: object, digests: set[str], scope_names: set[str]) -> list[Reference]:
    """The references, each within the bundle by the rules of proxy/store/index/sets.py."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadBundle(f"{MANIFEST} lists no references")
    references = []
    for entry in entries:
        times = [entry.get("fetched_at"), entry.get("expires_at")]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times):
            raise BadBundle(f"{MANIFEST}: a reference without its times")
        validators, meta = entry.get("validators"), entry.get("meta")
        if not isinstance(validators, dict) or not isinstance(meta, dict):
            raise BadBundle(f"{MANIFEST}: a reference without validators or meta")
        references.append(Reference(_text(entry, "source", 16), _text(entry, "key", 1024), _optional(entry, "digest", 100) or "",
                                    float(times[0]), float(times[1]), validators, meta))
    keys_name = {word for ref in references for word in named_hashes(ref.key)}
    seen: set[tuple[str, str]] = set()
    for ref in references:
        if (ref.source, ref.key) in seen:
            raise BadBundle(f"{MANIFEST}: the reference {ref.source} {ref.key[:200]!r} twice")
        seen.add((ref.source, ref.key))
        if not admissible(ref, digests, keys_name, scope_names):
            raise BadBundle(f"the reference {ref.source} {ref.key[:200]!r} names {ref.digest[:80] or 'nothing'}, "
                            "which is not in the bundle: refused")
    return references


def _text(entry: Mapping[str, Any], key: str, limit: int) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value or len(value) > limit or any(ord(c) < 0x20 for c in value):
        raise BadBundle(f"{MANIFEST}: {key!r} is missing or not a short line of text")
    return value


def _optional(entry: Mapping[str, Any], key: str, limit: int) -> str | None:
    return None if entry.get(key) in (None, "") else _text(entry, key, limit)
