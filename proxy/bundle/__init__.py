"""Bundles: a resource set carried in one file to a node that cannot reach its upstreams
(`pullthrough export --set NAME FILE`, `pullthrough import FILE`).

A bundle is one uncompressed POSIX (pax) tar file:
- `pullthrough-bundle.json` first: the format and version, the set's name, its listing (as the
  listing endpoint shows it right after a prefetch), every blob (digest, size, media type, origin
  and the read scopes it was admitted under), and every reference that names the set's blobs
  (tags, S3 keys, Hub revisions and files, a Hub repo's visibility: see proxy/store/index/sets.py);
- then each blob at `blobs/sha256/<hex>`, in the order the JSON lists them;
- last `pullthrough-bundle.json.sha256`, the JSON's digest (the blobs carry their own).
Uncompressed, because what a set holds is compressed already (image layers are gzip or zstd,
model weights hardly compress): compressing again would cost a core for a few percent, while an
uncompressed tar streams at disk speed and leaves the choice to a pipe (`| zstd`); import reads
gzip, bzip2 and xz bundles as well. The JSON comes first, so that an import checks every member
against it as the tar streams by (a bundle may arrive on stdin, `-`). A bundle is the blobs' bytes
plus 0.5 to 1 KiB per blob (header, padding), the JSON, and up to 11 KiB of tar ending.

Export brings the set up to date first, as `pullthrough prefetch --set` does (inside the TTLs
nothing is asked upstream; offline, nothing at all), and refuses a set that is not whole. It
streams each blob from its cache file and hashes it on the way: a damaged cache file is found
here, not across the air gap.

Import refuses a bundle whole (BadBundle, nothing written) unless every check passes before
anything is committed: the JSON's format, version, listing and fields; only regular members, each
at the path of a blob the JSON lists (never an extracted path: no traversal, link or device can
reach the file system), none twice, none missing; every blob's size and sha256, each read into a
temp file in the store's tmp/; the JSON's digest; the tar's header checksums, padding and ending
(proxy/bundle/tar.py): one altered byte anywhere is refused. This guards against damage and
tampering on the way, not forgery (there is no signature): whoever may import may write the index. Names and scopes must stay within the bundle's blobs: a reference
names one of them, a hash another reference names, or (without a digest) one of the bundle's
scopes; scopes admit only the bundle's blobs. Then, with no janitor pass running on the cache,
the files are renamed into place, and blob rows, scopes, references and the set's pins (exactly
the bundle's digests) are written in one transaction. Importing again changes nothing; a name this
node answered later than the bundle's node keeps its own answer.

Import needs no upstream and no server; it works on an `offline = true` node and beside a
running server of the same cache (files appear by rename, the index takes both writers). Such a
server reads a newly imported name at its next lookup; a name it already answers from memory
(fresh within its TTL) switches at the end of that TTL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from proxy.bundle.manifest import CHECKSUM, MANIFEST, MAX_MANIFEST_BYTES, BadBundle, blob_member, build, checksum, parse
from proxy.bundle.tar import BLOCK, TarDamaged, TarReader, end_of_archive, write_member
from proxy.config import Settings
from proxy.offline import CacheUnavailable, open_cache
from proxy.store.blobs import BlobStore, DigestMismatch
from proxy.store.digest import Digest
from proxy.store.janitor import Janitor, Policy
from proxy.store.records import SetContents

__all__ = ["BadBundle", "Summary", "export_set", "import_bundle", "write_bundle"]

TOUCH_SECONDS = 600.0  # staged files are touched this often: janitors sweep temp files idle for an hour


@dataclass(frozen=True)
class Summary:
    """What an export wrote or an import loaded."""

    name: str
    blobs: int
    bytes: int
    references: int
    scopes: int
    listing: Mapping[str, Any]
    new_blobs: int | None = None  # import: blobs this cache did not hold
    written_references: int | None = None  # import: the others were newer here
    bundle_bytes: int | None = None  # export

    def as_json(self) -> dict[str, Any]:
        document = {k: v for k, v in self.__dict__.items() if v is not None and k != "name"}
        return {"set": self.name, **document}


def _summary(listing: Mapping[str, Any], contents: SetContents, sizes: Mapping[str, int], **more: int) -> Summary:
    scopes = {s for found in contents.scopes.values() for s in found}
    return Summary(contents.name, len(sizes), sum(sizes.values()), len(contents.references), len(scopes), listing, **more)


# -- export ---------------------------------------------------------------------------------------

def export_set(settings: Settings, name: str, destination: Path | None) -> Summary:
    """Write the bundle of set `name` to `destination` (None: stdout). A file appears only whole."""
    import asyncio

    listing, contents = asyncio.run(_current(settings, name))
    files = BlobStore(settings.cache_dir, node_id=settings.node_name)
    if destination is None:
        return write_bundle(files, listing, contents, sys.stdout.buffer)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            summary = write_bundle(files, listing, contents, out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return summary


async def _current(settings: Settings, name: str) -> tuple[dict[str, Any], SetContents]:
    """The set prefetched now (its listing), and what the index holds for it."""
    from proxy.prefetch import fetch_set, running

    async with running(settings) as runtime:
        listing = await fetch_set(runtime, name)
        states = {**listing["status"]["images"], **listing["status"]["remote"]}  # type: ignore[dict-item]
        failed = {label: state["error"] or "not in the cache" for label, state in states.items() if not state["cached"]}
        if failed:
            label, error = next(iter(failed.items()))
            raise CacheUnavailable(f"{name}: {label}: {error}: a bundle holds a whole set, nothing exported")
        contents = await runtime.store.pools.index(runtime.index.sets.contents, name)
    return listing, contents


def write_bundle(files: BlobStore, listing: Mapping[str, Any], contents: SetContents, out: IO[bytes]) -> Summary:
    """Blocking: the tar to `out`, each blob streamed from its file and hashed on the way."""
    sizes = {}
    for digest in contents.digests:
        found = files.stat(Digest.parse(digest))
        if found is None:
            raise CacheUnavailable(f"{digest} is pinned by {contents.name} but not in the cache (`pullthrough prefetch --set`)")
        sizes[digest] = found.size
    data = build(listing, contents, sizes)
    mtime = int(time.time())
    written = write_member(out, MANIFEST, io.BytesIO(data), len(data), mtime)
    for digest in contents.digests:
        with open(files.path_for(Digest.parse(digest)), "rb", buffering=0) as blob:
            hasher = hashlib.sha256()
            written += write_member(out, blob_member(digest), blob, sizes[digest], mtime, hasher)
        if f"sha256:{hasher.hexdigest()}" != digest:
            raise CacheUnavailable(f"{digest}: the cache's file no longer matches its digest (`pullthrough verify --repair`)")
    seal = f"{checksum(data)}\n".encode()
    written += write_member(out, CHECKSUM, io.BytesIO(seal), len(seal), mtime)
    end = end_of_archive(written)
    out.write(end)
    return _summary(listing, contents, sizes, bundle_bytes=written + len(end))


# -- import ---------------------------------------------------------------------------------------

def import_bundle(settings: Settings, source: Path | None) -> Summary:
    """Load a bundle (None: from stdin) into the configured cache, or refuse it whole."""
    try:
        stream = open(source, "rb") if source is not None else contextlib.nullcontext(sys.stdin.buffer)
    except OSError as exc:
        raise BadBundle(f"{source}: {(exc.strerror or str(exc)).lower()}") from None
    files, index = open_cache(settings, write=True)
    try:
        files.prepare()
        with stream as raw:
            listing, contents, staged = _read(files, raw)  # type: ignore[arg-type]
        try:
            with Janitor(files, index, Policy(default_ttl=settings.default_ttl)).held_off():
                new = sum(files.stat(Digest.parse(d)) is None for d in staged)
                for digest, path in staged.items():
                    files.place(path, Digest.parse(digest))
                written = index.sets.load(contents)
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
    finally:
        index.dispose()
    sizes = {d: r.size for d, r in contents.records.items()}
    return _summary(listing, contents, sizes, new_blobs=new, written_references=written)


def _read(files: BlobStore, raw: IO[bytes]) -> tuple[dict[str, Any], SetContents, dict[str, Path]]:
    """Blocking: the bundle's JSON and every blob verified into a staged temp file; BadBundle (and
    no staged file left) at the first thing wrong."""
    staged: dict[str, Path] = {}
    try:
        tar = TarReader(raw)
        members = tar.members()
        first = next(members, None)
        if first is None or first.name != MANIFEST or not first.regular or first.size > MAX_MANIFEST_BYTES:
            raise BadBundle(f"not a pullthrough bundle: it does not start with {MANIFEST}")
        data = _whole(tar)
        listing, contents = parse(data)
        _check_space(files, contents)
        expected = {blob_member(d): d for d in contents.digests}
        sealed, touched = False, time.monotonic()
        for member in members:
            if sealed:
                raise BadBundle(f"member {member.name[:200]!r} after {CHECKSUM}, the last: refused")
            if member.name == CHECKSUM and member.regular and member.size <= BLOCK:
                if _whole(tar).decode("ascii", "replace").strip() != checksum(data):
                    raise BadBundle(f"{MANIFEST} does not match its digest in {CHECKSUM}: the bundle was altered or damaged, nothing imported")
                sealed = True
                continue
            digest = expected.get(member.name) if member.regular else None
            if digest is None:
                raise BadBundle(f"member {member.name[:200]!r} is not a blob the bundle lists (a regular file at blobs/sha256/<hex>): refused")
            if digest in staged:
                raise BadBundle(f"{digest} appears twice in the bundle: refused")
            staged[digest] = _stage(files, tar, member.size, Digest.parse(digest), contents.records[digest].size)
            if time.monotonic() - touched > TOUCH_SECONDS:
                for path in staged.values():
                    os.utime(path)
                touched = time.monotonic()
        missing = [d for d in contents.digests if d not in staged]
        if missing:
            raise BadBundle(f"the bundle ends before {missing[0]} ({len(missing)} blobs missing: cut short?): refused")
        if not sealed:
            raise BadBundle(f"the bundle ends before {CHECKSUM} (cut short?): refused")
        return listing, contents, staged
    except BaseException as exc:
        for path in staged.values():
            path.unlink(missing_ok=True)
        if isinstance(exc, TarDamaged):
            raise BadBundle(f"not a readable bundle: {exc}: refused") from None
        raise


def _whole(tar: TarReader) -> bytes:
    parts = []
    while chunk := tar.read():
        parts.append(chunk)
    return b"".join(parts)


def _stage(files: BlobStore, tar: TarReader, member_size: int, digest: Digest, size: int) -> Path:
    if member_size != size:
        raise BadBundle(f"{digest}: {member_size} bytes in the tar, {size} in {MANIFEST}: refused")
    temp = files.new_temp()
    try:
        while chunk := tar.read():
            temp.append(chunk)
        return files.stage(temp, digest, size)
    except DigestMismatch:
        actual = temp.hexdigest()
        temp.discard()
        raise BadBundle(f"{digest}: the bundle's bytes hash to sha256:{actual}: altered or damaged, nothing imported") from None
    except BaseException:
        temp.discard()
        raise


def _check_space(files: BlobStore, contents: SetContents) -> None:
    needed = sum(r.size for r in contents.records.values())
    stat = os.statvfs(files.tmp_dir)
    if stat.f_bavail * stat.f_frsize < needed:
        raise CacheUnavailable(f"the bundle needs {needed} bytes, {files.tmp_dir} has {stat.f_bavail * stat.f_frsize} free")
