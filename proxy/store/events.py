"""What the store tells whoever keeps the books (proxy/stats.py): every request it answered, and
every fill it ran or followed. The store counts; sources never do."""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from proxy.store.records import Origin, ReadScope


class Outcome(Enum):
    HIT = "hit"  # answered from the cache
    MISS = "miss"  # the content (or, for a HEAD, its presence) had to come from the upstream


class StoreEvents(Protocol):
    def request(self, origin: Origin, scope: ReadScope, outcome: Outcome, *, joined: bool) -> None:
        """One request for content, GET or HEAD; `joined`: it followed a fill already running.

        Called in the client's request task: the books may label that request (its duration and
        bytes, proxy/http/timing.py) with the outcome. A request that reads several objects (a
        Hub file after its revision) is labelled by the last, the one whose bytes it sends."""

    def sent_from_cache(self, origin: Origin, scope: ReadScope, nbytes: int) -> None:
        """Bytes a hit sends to its client."""

    def fetched(self, origin: Origin, nbytes: int) -> None:
        """Bytes of small objects that came from the upstream (fills report through fill_finished)."""

    def fill_finished(self, origin: Origin, nbytes: int, seconds: float, ok: bool) -> None: ...

    def fill_began(self, origin: Origin) -> None:
        """A fill started in this process: fetched here, or following another process's."""

    def fill_ended(self, origin: Origin) -> None:
        """That fill ended, however it ended (a fill that began always ends)."""

    def fill_followed(self, origin: Origin) -> None:
        """Another process of the fleet downloaded it; this one served it from the shared files."""

    def fill_taken_over(self, origin: Origin) -> None:
        """This process took the download over from another that went silent."""


class NoEvents:
    """For a store nobody counts (command-line tools, tests of the store alone)."""

    def request(self, origin: Origin, scope: ReadScope, outcome: Outcome, *, joined: bool) -> None:
        pass

    def sent_from_cache(self, origin: Origin, scope: ReadScope, nbytes: int) -> None:
        pass

    def fetched(self, origin: Origin, nbytes: int) -> None:
        pass

    def fill_finished(self, origin: Origin, nbytes: int, seconds: float, ok: bool) -> None:
        pass

    def fill_began(self, origin: Origin) -> None:
        pass

    def fill_ended(self, origin: Origin) -> None:
        pass

    def fill_followed(self, origin: Origin) -> None:
        pass

    def fill_taken_over(self, origin: Origin) -> None:
        pass
