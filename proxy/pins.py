"""Resource sets, a market's "required resources": pinned (never purged) and prefetched.

A set lists images and remote resources (S3 objects or prefixes, HF repos at a revision, IPFS
content, HTTPS URLs), in the configuration and, for a subscribed set, in the market's published
listing (proxy/subscriptions.py). Prefetching fetches each through the same sources as any client,
then pins every blob it consists of under the set's name; the pins are always the digests of what
is listed now, so an entry that leaves the listing is unpinned (and purged by the usual rules),
while an entry still listed keeps its last good prefetch's pins when it cannot be fetched. `GET /api/markets/{name}/required-resources`
answers in the seed's shape with each resource's state; `POST` (admin token) prefetches again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.config import RemoteResource, ResourceSet
from proxy.resources import parse_resource
from proxy.sources.source import Sources
from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest
from proxy.store.records import Reference
from proxy.store.store import Store
from proxy.subscriptions import Subscription

log = logging.getLogger(__name__)

ENTRY_DIGESTS = "set-entries"  # the index's references: per set, each listed entry's digests


@dataclass
class ResourceState:
    """What the last prefetch of one resource achieved."""

    blobs: int = 0
    bytes: int = 0
    cached: bool = False
    last_refreshed: float | None = None
    error: str | None = None
    digests: list[str] = field(default_factory=list)

    def as_json(self, missing: int = 0) -> dict[str, Any]:
        """`cached` only while every blob the resource consists of is on disk (a repair or a hand
        may have removed one since the prefetch); `missing` counts those that are not."""
        return {"cached": self.cached and missing == 0, "blobs": self.blobs, "bytes": self.bytes,
                "last_refreshed": self.last_refreshed, "error": self.error, "missing": missing}


@dataclass(frozen=True)
class PinnedSet:
    """What the index pins for one set, checked against the files actually in the store."""

    name: str
    configured: bool  # still in the settings (an unconfigured set's pins stay until a purge of them)
    digests: list[str]
    bytes: int  # of the pinned blobs on disk
    missing: list[str]  # pinned, but no file in the store

    @property
    def present(self) -> int:
        return len(self.digests) - len(self.missing)

    def as_json(self) -> dict[str, Any]:
        return {"configured": self.configured, "pinned": len(self.digests), "present": self.present,
                "bytes": self.bytes, "missing": self.missing, "digests": self.digests}


def pinned_sets(configured: list[ResourceSet], pins: dict[str, set[str]], files: BlobStore) -> list[PinnedSet]:
    """Blocking (one stat per pinned blob): every configured set, pinned or not, and every set the
    index still pins, in name order."""
    names = sorted({*(s.name for s in configured), *pins})
    configured_names = {s.name for s in configured}
    result = []
    for name in names:
        digests = sorted(pins.get(name, ()))
        sizes = {d: _size_on_disk(files, d) for d in digests}
        result.append(PinnedSet(
            name, name in configured_names, digests, sum(s for s in sizes.values() if s is not None),
            [d for d, s in sizes.items() if s is None],
        ))
    return result


def _size_on_disk(files: BlobStore, digest: str) -> int | None:
    try:
        found = files.stat(Digest.parse(digest))
    except ValueError:  # not a digest this store can hold: it cannot be on disk
        return None
    return found.size if found is not None else None


@dataclass(frozen=True)
class EntryDigests:
    """What one entry of a set consisted of at its last good prefetch, and when."""

    digests: list[str]
    at: float


class EntryPins:
    """Each entry's digests from its last good prefetch (by any node or command), saved in the index
    as one reference per set; the set's pins are written from them, and are exactly the digests of
    the entries listed now. An entry that cannot be fetched keeps its last good digests, across
    restarts and nodes; pins from before entries were recorded ("unattributed") are kept until
    every listed entry has digests of its own."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._mine: dict[str, dict[str, EntryDigests]] = {}  # this process's good prefetches
        self._locks: dict[str, asyncio.Lock] = {}

    def record(self, name: str, label: str, digests: list[str]) -> None:
        self._mine.setdefault(name, {})[label] = EntryDigests(list(digests), time.time())

    async def write(self, name: str, labels: list[str]) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            entries, unattributed = await self._saved(name)  # read again: another node may have written since
            for label, mine in self._mine.get(name, {}).items():
                if label not in entries or entries[label].at < mine.at:
                    entries[label] = mine
            kept = {label: entries[label] for label in labels if label in entries}
            digests = {d for entry in kept.values() for d in entry.digests}
            if len(kept) < len(labels):
                digests |= unattributed
            else:
                unattributed = set()
            await self._store.pin(name, sorted(digests))
            meta = {"entries": {label: {"digests": e.digests, "at": e.at} for label, e in kept.items()},
                    "unattributed": sorted(unattributed)}
            await self._store.refs.put(Reference(ENTRY_DIGESTS, name, "", time.time(), 0.0, {}, meta))

    async def _saved(self, name: str) -> tuple[dict[str, EntryDigests], set[str]]:
        saved = await self._store.refs.get(ENTRY_DIGESTS, name)
        if saved is None:  # never recorded: whatever the set has pinned is unattributed
            return {}, set((await self._store.pinned()).get(name, ()))
        entries = {label: EntryDigests(list(e["digests"]), float(e["at"])) for label, e in saved.meta.get("entries", {}).items()}
        return entries, set(saved.meta.get("unattributed", ()))


class ResourceSets:
    """Every configured set: what it lists now (its own entries and its subscription's), what each
    entry's last prefetch pinned, and the pins in the index, which are always exactly the digests
    of the entries listed now."""

    def __init__(
        self, sets: list[ResourceSet], store: Store, sources: Sources, http: httpx.AsyncClient,
        *, offline: bool = False,
    ) -> None:
        self.sets = {s.name: s for s in sets}
        self._store = store
        self._sources = sources
        self._states: dict[tuple[str, str], ResourceState] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one prefetch of a set at a time
        self._pin_locks: dict[str, asyncio.Lock] = {}  # short: the pins are written from what is listed now
        self._pins = EntryPins(store)
        self._generations: dict[str, int] = {}  # bumped when a set's listing changes: a full prefetch is due
        self.subscriptions = {
            s.name: Subscription(s, store.refs, http, offline) for s in sets if s.url is not None
        }

    def entries(self, name: str) -> tuple[list[str], list[RemoteResource]]:
        """The set's images and remote resources now: its own, then its subscription's last good listing."""
        resource_set = self.sets[name]
        images = dict.fromkeys(resource_set.images)
        remote = {r.display_url: r for r in resource_set.remote}
        subscription = self.subscriptions.get(name)
        if subscription is not None and subscription.listing is not None:
            images.update(dict.fromkeys(subscription.listing.images))
            for r in subscription.listing.remote:
                remote.setdefault(r.display_url, r)
        return list(images), list(remote.values())

    def labels(self, name: str) -> list[str]:
        images, remote = self.entries(name)
        return [*images, *(r.display_url for r in remote)]

    # -- following subscriptions -------------------------------------------------------------------
    async def run(self) -> None:
        """In the background for a server's life: every set prefetched; a subscribed set's listing
        read again every `refresh`, what left it unpinned at once, what is new (or failed) prefetched."""
        await asyncio.gather(*(self._follow(name) for name in self.sets))

    async def _follow(self, name: str) -> None:
        """The set's loop: its listing read (a subscribed set: again every `refresh`), then the
        prefetch worker started; a changed listing or a failed entry wakes it."""
        subscription = self.subscriptions.get(name)
        wanted = asyncio.Event()
        worker: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    changed = await self.refresh(name)
                except Exception:
                    log.exception("resource set %s: refresh failed", name)
                    changed = False
                if worker is None:  # after the first read: a prefetch before it would find nothing listed yet
                    wanted.set()
                    worker = asyncio.create_task(self._prefetch_when(name, wanted), name=f"prefetch {name}")
                elif changed or self._failed(name):
                    wanted.set()
                if subscription is None:
                    await worker  # a static set: one prefetch
                    return
                await asyncio.sleep(subscription.resource_set.refresh)
        finally:
            if worker is not None:
                worker.cancel()

    async def _prefetch_when(self, name: str, wanted: asyncio.Event) -> None:
        """Prefetch when woken: everything after a change of the listing, else only the entries
        whose last prefetch failed (one bad entry must not refetch the whole set every refresh)."""
        done = -1
        while True:
            await wanted.wait()
            wanted.clear()
            generation = self._generations.get(name, 0)
            try:
                await self.prefetch(name, only_failed=generation == done)
            except Exception:
                log.exception("prefetch of resource set %s failed", name)
            done = generation
            if name not in self.subscriptions:
                return

    def _failed(self, name: str) -> bool:
        """Whether an entry's last prefetch failed (tried again every refresh)."""
        return any((s := self._states.get((name, label))) is not None and s.error is not None for label in self.labels(name))

    async def refresh(self, name: str) -> bool:
        """Read a subscribed set's listing again (a static set: nothing to read); whether it changed.
        What left the listing is unpinned now, whatever the upstreams' state."""
        subscription = self.subscriptions.get(name)
        if subscription is None:
            return False
        changed = await subscription.refresh()
        self._lend_s3(subscription)
        if changed:
            self._generations[name] = self._generations.get(name, 0) + 1
            await self._write_pins(name)
        return changed

    async def restore(self) -> None:
        """The subscribed listings saved by the last good reads, in use before (or instead of, offline)
        reading them again: an air-gapped node or a restart while the market is down serves them."""
        for subscription in self.subscriptions.values():
            try:
                await subscription.load()
            except Exception as exc:  # noqa: BLE001 - the refresh tries again and says why
                log.warning("resource set %s: cannot read the saved listing: %s", subscription.resource_set.name, exc)
            self._lend_s3(subscription)

    def _lend_s3(self, subscription: Subscription) -> None:
        """The s3:// URLs a subscribed listing names are served without a bucket entry (proxy/sources/s3)."""
        listed = subscription.listing.remote if subscription.listing else ()
        s3 = self._sources.named("s3")
        s3.subscribe(subscription.resource_set.name, (r.display_url for r in listed if r.type == "S3"))  # type: ignore[attr-defined]

    async def update(self, name: str) -> dict[str, Any]:
        """The listing read again, then everything listed prefetched: `prefetch --set` and POST."""
        await self.refresh(name)
        return await self.prefetch(name)

    # -- prefetch --------------------------------------------------------------------------------
    async def prefetch(self, name: str, *, only_failed: bool = False) -> dict[str, Any]:
        """Fetch every resource of the set (`only_failed`: those whose last prefetch failed) and pin
        what it consists of; the listing afterwards. A resource whose fetch fails keeps what its
        last good prefetch pinned."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            platforms = self.sets[name].platforms
            for label in self.labels(name):
                state = self._states.get((name, label))
                if only_failed and state is not None and state.error is None:
                    continue
                await self._run(name, label, platforms)
            await self._write_pins(name)
        return await self.listing(name)

    async def _run(self, name: str, label: str, platforms: list[str]) -> ResourceState:
        state = ResourceState(last_refreshed=time.time())
        try:
            fetched = await self._sources.prefetch(parse_resource(label), platforms)
            state.digests = [f.digest for f in fetched.files]
            state.blobs, state.bytes, state.cached = len(fetched.files), fetched.bytes, True
            log.info("resource set %s: %s cached (%d blobs, %d bytes)", name, label, state.blobs, state.bytes)
        except Exception as exc:  # noqa: BLE001 - the state says what went wrong; the other resources go on
            state.error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            previous = self._states.get((name, label))
            state.digests = previous.digests if previous else []
            log.warning("resource set %s: %s failed: %s", name, label, state.error)
        self._states[(name, label)] = state
        if state.error is None:
            self._pins.record(name, label, state.digests)
        return state

    # -- pins ------------------------------------------------------------------------------------
    async def _write_pins(self, name: str) -> None:
        """Pin what the set lists now. A subscribed set whose listing was never read (a new URL,
        the dashboard down at the first start) lists nothing yet: its pins are left alone."""
        subscription = self.subscriptions.get(name)
        if subscription is not None and subscription.listing is None:
            return
        await self._pins.write(name, self.labels(name))

    # -- the listing ---------------------------------------------------------------------------------
    async def listing(self, name: str) -> dict[str, Any]:
        """The seed's JSON shape (`required_images`, `required_remote_resources` with type and url)
        plus each resource's state, `cached` from the files on disk now."""
        images, remote = self.entries(name)
        states = {label: self._states.get((name, label), ResourceState()) for label in self.labels(name)}
        missing = await self._store.pools.files(self._missing, states)
        status = {label: state.as_json(missing[label]) for label, state in states.items()}
        listing: dict[str, Any] = {
            "name": name,
            "required_images": images,
            "required_remote_resources": [{"type": r.type, "url": r.display_url} for r in remote],
            "status": {
                "images": {i: status[i] for i in images},
                "remote": {r.display_url: status[r.display_url] for r in remote},
            },
        }
        if (subscription := self.subscriptions.get(name)) is not None:
            listing["subscription"] = subscription.as_json()
        return listing

    def _missing(self, states: dict[str, ResourceState]) -> dict[str, int]:
        """Blocking: how many of each resource's blobs have no file in the store."""
        return {label: sum(_size_on_disk(self._store.files, d) is None for d in state.digests) for label, state in states.items()}

    # -- HTTP --------------------------------------------------------------------------------------------
    def routes(self, admin_check: Any) -> list[BaseRoute]:
        async def required_resources(request: Request) -> Response:
            name = request.path_params["name"]
            if name not in self.sets:
                return JSONResponse({"error": f"no resource set named {name[:128]!r}"}, status_code=404)
            if request.method == "POST":
                if (refusal := admin_check(request)) is not None:
                    return refusal
                return JSONResponse(await self.update(name))
            return JSONResponse(await self.listing(name))

        return [Route("/api/markets/{name}/required-resources", required_resources, methods=["GET", "POST"])]

