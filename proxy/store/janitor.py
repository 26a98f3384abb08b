"""The janitor: TTL and size purges, the orphan sweep, and the integrity scrub.

TTLs count from the last access or, where a rule says so, from the download, per source and
upstream where configured; the size cap and the free-space floor evict least recently used blobs
first; pinned blobs never go, nor anything read within the grace period (except past a lifetime
counted from the download, which no amount of reading extends). Rows go before files, and the sweep reconciles both after any
crash: a file without a row is adopted (files reach blobs/ only after verification), a row
without a file is dropped. Everything here blocks; the server runs it in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest, InvalidDigest
from proxy.store.index import Index
from proxy.store.records import PurgeRecord

log = logging.getLogger(__name__)

BATCH = 5000
FINISHED_LEASE_SECONDS = 600.0  # followers read a committed lease's digest within a second
STALE_SECONDS = 3600.0  # a live fill writes its temp file and renews its lease far more often
ADOPT_AFTER_SECONDS = 60.0  # a committer adds its row right after its rename
UNBACKED_SCOPE_SECONDS = 86400.0  # a manifest listed layers a day ago that nobody pulled since
_HEX64 = re.compile(r"[0-9a-f]{64}")


TtlFrom = Literal["access", "download"]


@dataclass(frozen=True)
class TtlRule:
    """Blobs of one source (and upstream, if given) are purged `ttl` seconds after their last
    access, or after their download (the index row's `created_at`: the commit, or for a file the
    sweep found without a row, the file's last write) when `ttl_from` is "download"."""

    source: str
    upstream: str | None
    ttl: float
    ttl_from: TtlFrom = "access"


@dataclass(frozen=True)
class Policy:
    default_ttl: float
    rules: tuple[TtlRule, ...] = ()
    default_ttl_from: TtlFrom = "access"  # for blobs no rule names
    max_size: int | None = None
    min_free: int | None = None
    grace: float = 120.0  # never remove what was read this recently (a reader may be opening it)
    forget: tuple[str, ...] = ()  # reference namespaces (negative answers) removed once expired


@dataclass
class PurgeResult:
    removed: list[tuple[str, int]] = field(default_factory=list)
    orphan_files: int = 0
    orphan_rows: int = 0
    dry_run: bool = False
    skipped: bool = False  # another janitor was running

    @property
    def bytes_removed(self) -> int:
        return sum(size for _, size in self.removed)


class Janitor:
    def __init__(self, store: BlobStore, index: Index, policy: Policy, *, adopt_after: float = ADOPT_AFTER_SECONDS) -> None:
        self.store = store
        self.adopt_after = adopt_after
        self.index = index
        self.policy = policy
        self._scopes_dropped_at = time.time()  # the first scan a day after start: it reads every admission

    def purge(
        self,
        *,
        dry_run: bool = False,
        older_than: float | None = None,
        to_size: int | None = None,
        reason: str = "periodic",
        now: float | None = None,
    ) -> PurgeResult:
        """One pass: sweep orphans, then expired blobs, then the least recently used above the cap.

        One janitor at a time over a shared cache: a pass that finds another running does nothing.
        """
        with self._only_janitor() as alone:
            if not alone:
                log.info("purge skipped: another janitor is running on this cache")
                return PurgeResult(dry_run=dry_run, skipped=True)
            return self._purge(dry_run=dry_run, older_than=older_than, to_size=to_size, reason=reason, now=now)

    @contextlib.contextmanager
    def _only_janitor(self) -> Iterator[bool]:
        """The database's lock (PostgreSQL) and a lock file in the cache dir (every engine)."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        with open(self.store.root / "janitor.lock", "a+") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                with self.index.exclusive("janitor") as got:
                    yield got
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held_off(self, timeout: float = 600.0) -> Iterator[None]:
        """No janitor pass on this cache while the block runs (a pass that starts meanwhile skips,
        as it does beside another janitor), waiting up to `timeout` seconds for a running one to
        end: for a writer that renames files into blobs/ before their rows exist (an import), which
        a sweep would otherwise adopt as unknown, or a purge remove, in between."""
        deadline = time.monotonic() + timeout
        while True:
            with self._only_janitor() as alone:
                if alone:
                    yield
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"a janitor pass on {self.store.root} did not end within {timeout:g} s")
            time.sleep(0.5)

    def _purge(
        self, *, dry_run: bool, older_than: float | None, to_size: int | None, reason: str, now: float | None
    ) -> PurgeResult:
        started = time.time()
        now = now if now is not None else started
        result = PurgeResult(dry_run=dry_run)
        if not dry_run:
            result.orphan_files, result.orphan_rows = self.sweep()
            self._forget_leftovers(now)
        chosen: dict[str, int] = dict(self._expired(now, older_than))
        if not dry_run:
            self._remove(list(chosen))  # before the size pass, which then need not skip them
        evicted = self._over_capacity(now, to_size, {} if not dry_run else chosen)
        if not dry_run:
            self._remove([digest for digest, _ in evicted])
        chosen.update(evicted)
        result.removed = list(chosen.items())
        if not dry_run:
            self.index.purges.record(
                PurgeRecord(started, time.time(), reason, len(chosen), result.bytes_removed, result.orphan_files, result.orphan_rows)
            )
        log.info(
            "purge (%s)%s: %d blobs, %d bytes; orphans: %d files adopted, %d rows dropped",
            reason, " dry run" if dry_run else "", len(chosen), result.bytes_removed, result.orphan_files, result.orphan_rows,
        )
        return result

    def _forget_leftovers(self, now: float) -> None:
        """Drop lease rows of finished fills and temp files no process has written to for an hour
        (what nodes that died and never came back under the same name left behind), and read
        scopes admitted to digests that never became a blob."""
        leases = self.index.leases.drop_old(finished_before=now - FINISHED_LEASE_SECONDS, renewed_before=now - STALE_SECONDS)
        temps = self.store.sweep_stale_temps(STALE_SECONDS)
        scopes = 0
        if now - self._scopes_dropped_at >= UNBACKED_SCOPE_SECONDS:  # a scan of every admission: daily
            scopes = self.index.blobs.drop_unbacked_scopes(created_before=now - UNBACKED_SCOPE_SECONDS)
            self._scopes_dropped_at = now
        refs = self.index.refs.drop_expired(self.policy.forget, now)
        if leases or temps or scopes or refs:
            log.info(
                "forgot %d finished fill leases, %d stale temp files, %d unbacked read scopes and %d expired answers",
                leases, temps, scopes, refs,
            )

    def _expired(self, now: float, older_than: float | None) -> list[tuple[str, int]]:
        if older_than is not None:
            return self._all_unused_since(now - older_than, None, None, [])
        found: list[tuple[str, int]] = []
        for rule in self.policy.rules:
            found += self._past_lifetime(now - rule.ttl, rule.ttl_from, rule.source, rule.upstream, [])
        exclude = [(r.source, r.upstream) for r in self.policy.rules]
        found += self._past_lifetime(now - self.policy.default_ttl, self.policy.default_ttl_from, None, None, exclude)
        return found

    def _past_lifetime(
        self, cutoff: float, ttl_from: TtlFrom, source: str | None, upstream: str | None,
        exclude: list[tuple[str | None, str | None]],
    ) -> list[tuple[str, int]]:
        if ttl_from == "download":
            # No last-access grace here: a blob read every minute would otherwise never reach the
            # end of a lifetime that counts from its download, which is the point of the rule. The
            # grace guards a reader that has found the file but not opened it yet; every response
            # reads through a descriptor of its own, and files are unlinked, never truncated, so a
            # reader that holds the file finishes it. What is lost is only a request caught between
            # its stat and its open (it fails, and the client's retry fetches the blob again), and,
            # on a cache shared over NFS, a read in progress on another node (NFS has no unlinked-
            # but-open files across clients): the price of a lifetime nobody's reads can extend.
            return self._all_downloaded_before(cutoff, source, upstream, exclude)
        return self._all_unused_since(cutoff, source, upstream, exclude)

    def _all_unused_since(
        self, cutoff: float, source: str | None, upstream: str | None, exclude: list[tuple[str | None, str | None]]
    ) -> list[tuple[str, int]]:
        cutoff = min(cutoff, time.time() - self.policy.grace)
        return self.index.blobs.unused_since(cutoff, source=source, upstream=upstream, exclude=exclude, limit=10**9)

    def _all_downloaded_before(
        self, cutoff: float, source: str | None, upstream: str | None, exclude: list[tuple[str | None, str | None]]
    ) -> list[tuple[str, int]]:
        cutoff = min(cutoff, time.time() - self.policy.grace)  # never a blob committed this instant
        return self.index.blobs.downloaded_before(cutoff, source=source, upstream=upstream, exclude=exclude, limit=10**9)

    def _over_capacity(self, now: float, to_size: int | None, chosen: dict[str, int]) -> list[tuple[str, int]]:
        cap = to_size if to_size is not None else self.policy.max_size
        if cap is None and self.policy.min_free is None:
            return []
        total = sum(u.bytes for u in self.index.blobs.usage()) - sum(chosen.values())
        excess = total - cap if cap is not None else 0
        if self.policy.min_free is not None:
            free = shutil.disk_usage(self.store.root).free + sum(chosen.values())
            excess = max(excess, self.policy.min_free - free)
        taken: dict[str, int] = {}
        limit = len(chosen) + BATCH
        while excess > 0:
            candidates = self.index.blobs.least_recently_used(accessed_before=now - self.policy.grace, limit=limit)
            for digest, size in candidates:
                if excess <= 0:
                    break
                if digest not in chosen and digest not in taken:
                    taken[digest] = size
                    excess -= size
            if len(candidates) < limit:
                break  # nothing more may go: the rest is pinned or in use
            limit *= 2
        return list(taken.items())

    def _remove(self, digests: list[str]) -> None:
        # Rows first: a crash in between leaves files without rows, which the sweep adopts or
        # the next purge removes; never a row that points at nothing for long.
        self.index.blobs.remove(digests)
        # One at a time: unlinks in parallel contend for the shard directories' locks (measured
        # 2.5x slower with four threads on a million files).
        root = str(self.store.blobs_dir / "sha256")
        for digest in digests:
            hex_digest = digest.removeprefix("sha256:")
            if not _HEX64.fullmatch(hex_digest):
                continue  # never a path from anything but a digest
            try:
                os.unlink(f"{root}/{hex_digest[:2]}/{hex_digest}")
            except FileNotFoundError:
                pass

    def sweep(self) -> tuple[int, int]:
        """Make the index and the files agree: (files adopted, rows dropped).

        Another node may commit a blob while this runs: it renames the file into place, then adds
        its row. So rows are read before files are listed (a row read first has its file in place,
        and is never taken for a dangling one), and a file without a row is adopted only once its
        rename is older than `adopt_after` (a fresh one's row is on its way, with its real
        origin; a later sweep adopts it if the committer died in between).
        """
        indexed = self.index.blobs.all_digests()
        on_disk = set(self._digests_on_disk())
        settled_before = time.time() - self.adopt_after
        adopted = 0
        for digest in on_disk - indexed:
            try:
                stat = self.store.path_for(Digest.parse(digest)).stat()
            except FileNotFoundError:
                continue  # purged since the listing
            if stat.st_ctime > settled_before:
                continue
            # Downloaded when its file was last written (before the rename), not now: a lifetime that
            # counts from the download must not start again because a crash lost the file's row.
            self.index.blobs.add(digest, stat.st_size, source="unknown", upstream="unknown", created_at=stat.st_mtime)
            adopted += 1
        dangling = [d for d in indexed if d not in on_disk]
        if dangling:
            self.index.blobs.remove(dangling)
        return adopted, len(dangling)

    def sweep_alone(self) -> tuple[int, int] | None:
        """The sweep under the janitors' lock (None when another janitor holds it: it sweeps)."""
        with self._only_janitor() as alone:
            return self.sweep() if alone else None

    def _digests_on_disk(self) -> list[str]:
        """Every blob file's digest, from the directory entries alone (no stat per file)."""
        found = []
        root = self.store.blobs_dir / "sha256"
        if not root.is_dir():
            return found
        for shard in os.scandir(root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                    try:
                        found.append(str(Digest.from_hex(entry.name)))
                    except InvalidDigest:
                        continue
        return found

    def verify(self, *, repair: bool = False) -> list[str]:
        """Rehash every blob; the digests that no longer match (removed when `repair`)."""
        bad = []
        for digest in self._digests_on_disk():
            path = self.store.path_for(Digest.parse(digest))
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 * 1024 * 1024):
                    hasher.update(chunk)
            if f"sha256:{hasher.hexdigest()}" != digest:
                bad.append(digest)
        if repair and bad:
            self._remove(bad)
        return bad
