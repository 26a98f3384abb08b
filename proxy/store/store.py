"""The store's one door: what every source calls to read bytes, and nothing else.

`serve` answers a blob read (a hit, a local fill, or another node's fill followed) with Range,
in-use tracking, accounting and the last-byte-after-verification rule inside; `fetch` does the
same for a prefetch; `small_objects` (small.py) is the door for what is held whole: manifests by
digest, and answers fetched whole and named by a key (HF API answers, S3 listings). Every read
names the caller's read scope: cached bytes are served only under a scope that admitted them, and
anything else is a cold request the upstream decides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import Response

from proxy.http.responses import ByteSource, blob_response
from proxy.store.blobs import BlobFile, BlobStore
from proxy.store.digest import Digest
from proxy.store.events import NoEvents, Outcome, StoreEvents
from proxy.store.fill import Fill
from proxy.store.filler import Filler, FillPlan, confirm_by_opening
from proxy.store.freshness import Freshness
from proxy.store.index import Index
from proxy.store.leases import FillLeases
from proxy.store.memo import AccessLog, BlobsInUse
from proxy.store.pools import Pools, PoolSizes
from proxy.store.readers import FileSource
from proxy.store.records import Origin, ReadScope
from proxy.store.references import References
from proxy.store.requests import BlobRequest, FetchFailed
from proxy.store.scopes import Scopes
from proxy.store.small import SmallObjects

log = logging.getLogger(__name__)

ACCESS_FLUSH_SECONDS = 15.0


@dataclass(frozen=True)
class _Opened:
    source: ByteSource | None  # None: nothing to send (a HEAD)
    size: int
    outcome: Outcome
    joined: bool = False


class Store:
    """The cache as sources see it. Knows nothing of registries or hubs."""

    def __init__(
        self,
        root: Path,
        index: Index,
        *,
        node: str,
        events: StoreEvents | None = None,
        pools: Pools | None = None,
        lease_seconds: float | None = 15.0,
        follow_streams: bool = True,
        small_object_bytes: int = 64 * 1024 * 1024,
        offline: bool = False,
        drop_behind: bool = False,
    ) -> None:
        self.files = BlobStore(root, node_id=node, drop_behind=drop_behind)
        self.index = index
        self.pools = pools or Pools(PoolSizes())  # the store's from here on: it shuts them down
        self._events: StoreEvents = events or NoEvents()
        self.leases = FillLeases(index, self.pools, self.files.node_id, lease_seconds) if lease_seconds is not None else None
        self._filler = Filler(
            self.files, self.pools, self._verified, self._committed, self._events, self.leases, follow_streams=follow_streams
        )
        self._in_use = BlobsInUse()
        self._access = AccessLog()
        self.refs = References(index, self.pools)
        self.freshness = Freshness(self.refs, offline=offline)
        self.scopes = Scopes(index, self.pools)
        self.small_objects = SmallObjects(
            self.files, index, self.pools, self.scopes, self.freshness, self._events, self._access, small_object_bytes
        )
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pools.files(self.files.prepare)
        self._flusher = asyncio.create_task(self._flush_periodically(), name="access flush")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self._filler.aclose()
        try:
            await self.flush_access()
        except Exception as exc:  # noqa: BLE001 - shutting down: the next start's sweep and hits refresh them
            log.warning("could not write the last access times: %s", exc)
        finally:
            self.pools.shutdown()

    def fill_in_flight(self, key: str) -> Fill | None:
        """The fill running in this process for a fill key (a digest, or an object's name): for
        operators' views and tests; sources never need it."""
        return self._filler.inflight(key)

    # -- the door: blobs -----------------------------------------------------------------------
    async def serve(
        self, request: BlobRequest, *, method: str, range_header: str | None, headers: Mapping[str, str], media_type: str
    ) -> Response:
        """GET or HEAD of a blob for one caller: 200 or 206, counted once."""
        try:
            opened = await self._open(request, method)
            response = blob_response(
                opened.source, opened.size, method=method, range_header=range_header, headers=headers, media_type=media_type
            )
        except Exception as exc:  # noqa: BLE001 - the source words every failure in its protocol
            raise request.translate(exc) from None
        self._events.request(request.origin, request.scope, opened.outcome, joined=opened.joined)
        if opened.outcome is Outcome.HIT and method == "GET":
            self._events.sent_from_cache(request.origin, request.scope, int(response.headers["content-length"]))
        return response

    async def fetch(self, request: BlobRequest) -> BlobFile:
        """Make sure the blob is cached and readable under the request's scope (prefetch)."""
        try:
            blob = await self._readable_blob(request)
            if blob is not None:
                return blob
            fill, _ = await self._attach(request)
            done = await fill.finished()
            if done is None:
                raise fill.error or FetchFailed(f"fetching {request.fill_key} failed")
            return done
        except Exception as exc:  # noqa: BLE001
            raise request.translate(exc) from None

    async def _open(self, request: BlobRequest, method: str) -> _Opened:
        blob = await self._readable_blob(request)
        if blob is not None:
            self._access.touch(blob.digest)
            return _Opened(FileSource(blob, self._in_use, self.pools), blob.size, Outcome.HIT)
        if method == "HEAD":
            return await self._head_miss(request)
        fill, joined = await self._attach(request)
        size = None if request.whole_first else await fill.opened()
        if size is None:
            # Asked to (or the upstream announced no length): the client gets the blob once it is whole.
            done = await fill.finished()
            if done is None:
                raise fill.error or FetchFailed(f"fetching {request.fill_key} failed")
            return _Opened(FileSource(done, self._in_use, self.pools), done.size, Outcome.MISS, joined)
        return _Opened(fill, size, Outcome.MISS, joined)

    async def _readable_blob(self, request: BlobRequest) -> BlobFile | None:
        """The committed blob if this scope may read it (admitted, or confirmed by the upstream now)."""
        if request.digest is None:
            return None
        blob, admitted = await self._blob_and_admission(request.scope, request.digest)
        if blob is None:
            return None
        if admitted:
            return blob
        if request.name is not None and request.confirm is None:
            return None  # bytes named by an object's key: a fill by name lets the upstream decide
        await self._confirm(request)
        await self.admit(request.scope, [blob.digest])
        return blob

    async def _confirm(self, request: BlobRequest) -> None:
        """The upstream's yes for this scope, or its refusal raised. A fill by name needs none: its
        key (an object's name within a bucket or an allowed prefix) belongs to one scope."""
        if request.confirm is not None:
            await request.confirm()
        elif request.name is None:
            await confirm_by_opening(request.opener, self.pools)

    async def _head_miss(self, request: BlobRequest) -> _Opened:
        """A HEAD of something not cached: its size from a fill this scope may read, else from the
        upstream's confirmation or announcement. A HEAD never starts a fill."""
        fill = self._filler.inflight(request.fill_key)
        if fill is not None and request.scope in fill.scopes:
            size = await fill.opened()
            if size is not None:
                return _Opened(None, size, Outcome.MISS, joined=True)
        size = await request.confirm() if request.confirm is not None else request.size
        if size is None:
            raise FetchFailed("the upstream announced no size")
        return _Opened(None, size, Outcome.MISS)

    async def _attach(self, request: BlobRequest) -> tuple[Fill, bool]:
        """The fill in flight for the key, once the upstream confirmed this scope may read what it
        brings (joined), or a new fill."""
        fill = self._filler.inflight(request.fill_key)
        if fill is None:
            fill = self._filler.start(
                FillPlan(
                    request.fill_key, request.opener, request.origin, request.scope, request.fill_digest,
                    expected_size=request.size, check=request.check,
                )
            )
            if request.after_commit is not None:
                fill.after_commit.append(request.after_commit)
            return fill, False
        if request.scope not in fill.scopes:
            await self._confirm(request)
            fill.scopes.add(request.scope)
            if fill.blob is not None:  # committed while the upstream was asked: admit it here
                await self.admit(request.scope, [fill.blob.digest])
        fill.stats.followers += 1
        return fill, True

    async def _verified(self, fill: Fill, digest: Digest) -> None:
        """Before the fetched file appears under blobs/: admit the scopes that read the fill and run
        the requests' own follow-ups (naming the digest under an object's key), so that whoever
        finds the file finds it readable under their scope and named by its key too. A name that
        points at a file not there yet (or never, if the commit fails) reads as a miss."""
        for scope in list(fill.scopes):
            await self.admit(scope, [digest])
        await self._follow_ups(fill, BlobFile(digest, self.files.path_for(digest), fill.written))

    async def _committed(self, fill: Fill, blob: BlobFile, origin: Origin, fetched_here: bool) -> None:
        """Index the blob (when this process fetched it: its follow-ups ran in `_verified`), admit
        every scope that read the fill, and run the requests' follow-ups (when it adopted a blob
        another process or an earlier fill committed)."""
        if fetched_here:
            try:
                await self.pools.index(
                    self.index.blobs.add, str(blob.digest), blob.size, source=origin.source, upstream=origin.upstream
                )
            except Exception as exc:  # noqa: BLE001 - the file is valid; the sweep indexes it again
                log.warning("could not index %s: %s", blob.digest, exc)
        for scope in list(fill.scopes):
            await self.admit(scope, [blob.digest])
        if not fetched_here:
            await self._follow_ups(fill, blob)

    @staticmethod
    async def _follow_ups(fill: Fill, blob: BlobFile) -> None:
        for hook in fill.after_commit:
            try:
                await hook(blob)
            except Exception:
                log.exception("could not record what %s was fetched for", blob.digest)

    # -- read scopes (scopes.py); small objects have a door of their own: `small_objects` (small.py)
    async def holds(self, scope: ReadScope, digest: Digest) -> bool:
        """Whether the blob is committed and this scope may read it: served without the upstream."""
        blob, admitted = await self._blob_and_admission(scope, digest)
        return blob is not None and admitted

    async def _blob_and_admission(self, scope: ReadScope, digest: Digest) -> tuple[BlobFile | None, bool]:
        """The committed blob (or None) and whether `scope` may read it, in one thread hop: the
        file's stat alone when the admission is known, else the stat and then the index's answer
        in the same index thread (a hit after a restart; a miss costs no query)."""
        if self.scopes.known(scope, digest):
            return await self.pools.files(self.files.stat, digest), True

        def look() -> tuple[BlobFile | None, bool]:
            blob = self.files.stat(digest)
            return blob, blob is not None and self.scopes.ask_index(scope, digest)

        blob, admitted = await self.pools.index(look)
        if admitted:
            self.scopes.learned(scope, digest)
        return blob, admitted

    async def admitted(self, scope: ReadScope, digest: Digest) -> bool:
        return await self.scopes.admitted(scope, digest)

    async def admit(self, scope: ReadScope, digests: Iterable[Digest]) -> None:
        await self.scopes.admit(scope, digests)

    # -- pins and access times ---------------------------------------------------------------------
    async def pin(self, name: str, digests: list[str]) -> None:
        await self.pools.index(self.index.pins.replace, name, digests)

    async def pinned(self) -> dict[str, set[str]]:
        return await self.pools.index(self.index.pins.all)

    async def flush_access(self) -> None:
        for digest in self._in_use.digests():
            self._access.touch(digest, hit=False)
        batch = self._access.take()
        if batch:
            await self.pools.index(self.index.blobs.record_access, batch)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_SECONDS)
            try:
                await self.flush_access()
            except Exception:
                log.exception("could not write access times")
