"""One revalidation policy for every mutable name: fresh, else revalidate cheaply, else serve stale
and say so. Tags, HF revisions and API answers, access answers, S3 keys and web URLs all go
through `Freshness.resolve`; each source only says how to ask its upstream. Offline, every answer
held is fresh, and only a name never answered is asked for (the upstream clients refuse it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.singleflight import SingleFlight
from proxy.store.records import Reference

log = logging.getLogger(__name__)

FOREVER = float(2**62)


class UpstreamUnreachable(Exception):
    """The upstream could not answer (unreachable, 5xx, rate-limited): a stale answer may serve.

    Each source's "unavailable" error derives from it as well as from the source's own error type."""


@dataclass(frozen=True)
class Found:
    """What the upstream says a name points at now."""

    digest: str
    validators: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    ref: Reference
    asked: bool  # the upstream was asked for this answer
    stale: bool = False  # the upstream could not answer: this is the last known one

    @property
    def from_cache(self) -> bool:
        return not self.asked or self.stale


Revalidate = Callable[[Reference | None], Awaitable[Found]]
Usable = Callable[[Reference], Awaitable[bool]]


class ReferenceStore(Protocol):
    async def get(self, source: str, key: str) -> Reference | None: ...

    async def put(self, ref: Reference) -> None: ...


class Freshness:
    """Resolves names through a reference store (the index, or memory for answers that must never
    reach the disk), with one upstream question at a time per name."""

    def __init__(self, refs: ReferenceStore, *, offline: bool = False) -> None:
        self._refs = refs
        self.offline = offline
        self._flights: SingleFlight[Reference] = SingleFlight()

    async def resolve(
        self,
        source: str,
        key: str,
        *,
        ttl: float | None,
        revalidate: Revalidate,
        usable: Usable | None = None,
        stale: bool = True,
    ) -> Resolved:
        """The reference for (source, key): the cached one while fresh (and usable), else what
        `revalidate` finds now (given the previous reference, for its validators), kept for `ttl`
        seconds (None: forever). When `revalidate` raises UpstreamUnreachable and `stale` allows,
        the last usable reference is returned, marked stale; anything else it raises propagates.
        Offline, a usable reference is returned however old, without a question upstream."""
        ref = await self._refs.get(source, key)
        if ref is not None and (ref.is_fresh() or self.offline) and (usable is None or await usable(ref)):
            return Resolved(ref, asked=False)
        try:
            renewed = await self._flights.run((source, key), lambda: self._renew(source, key, ttl, ref, revalidate))
        except UpstreamUnreachable as exc:
            if not stale or ref is None or (usable is not None and not await usable(ref)):
                raise
            log.warning("%s %s: upstream unavailable (%s); serving the last known answer", source, key[:200], exc)
            return Resolved(ref, asked=True, stale=True)
        return Resolved(renewed, asked=True)

    async def _renew(self, source: str, key: str, ttl: float | None, previous: Reference | None, revalidate: Revalidate) -> Reference:
        found = await revalidate(previous)
        now = time.time()
        ref = Reference(
            source, key, found.digest, now, FOREVER if ttl is None else now + ttl,
            validators=dict(found.validators), meta=dict(found.meta),
        )
        await self._refs.put(ref)
        return ref
