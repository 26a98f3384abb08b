"""A pinned resource set's rows across the tables, read and written whole: what a bundle carries
from one node's index to another's (blob rows, the read scopes that admitted them, the references
that name them, the pins), so that the set is served by name there as it was here.

Which references belong to a set is decided here, from the index alone (the store knows no
source), by three rules a bundle's importer checks again (`admissible`):
- a reference whose digest is one of the set's blobs (`sha256:…`, or the bare hex some sources
  keep): a tag, an S3 key or web URL, a Hub file at a commit;
- a reference whose digest is a hash that the key of an already chosen reference names (a Hub
  file's key `repo@<commit>/path` names the commit that the revision `repo@main` points at);
- a reference without a digest, keyed by the name of a read scope of the set: what a source
  knows of the scope as a whole (a Hub repo's visibility, without which no file of it is served).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from sqlalchemy import Engine, case, delete, func, select
from sqlalchemy.orm import Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import BlobRow, BlobScopeRow, PinRow, ReferenceRow
from proxy.store.index.references import _reference
from proxy.store.records import BlobRecord, ReadScope, Reference, SetContents

_HASH_WORD = re.compile(r"(?:sha256:)?[0-9a-f]{40,64}")
_WORD_SEPARATORS = re.compile(r"[@/ ?&=#]")
IN_BATCH = 500  # values per IN (…): far below SQLite's and PostgreSQL's parameter limits


def named_hashes(key: str) -> set[str]:
    """The hashes a reference's key names as words of its own (a commit, a digest)."""
    return {word for word in _WORD_SEPARATORS.split(key) if _HASH_WORD.fullmatch(word)}


def admissible(ref: Reference, digests: set[str], keys_name: set[str], scope_names: set[str]) -> bool:
    """Whether one of the three rules above lets `ref` belong to a set of these blob `digests`,
    whose references' keys name `keys_name` and whose scopes are named `scope_names`."""
    if not ref.digest:
        return ref.key in scope_names
    return ref.digest in digests or ref.digest in keys_name or f"sha256:{ref.digest}" in digests


class SetRows:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def contents(self, name: str) -> SetContents:
        """Everything the index holds for the set `name` (empty when nothing is pinned under it)."""
        with Session(self.engine) as session:
            digests = sorted(session.scalars(select(PinRow.digest).where(PinRow.name == name)))
            records = {
                row[0]: BlobRecord(*row)
                for batch in _batches(digests)
                for row in session.execute(
                    select(BlobRow.digest, BlobRow.size, BlobRow.media_type, BlobRow.created_at, BlobRow.last_access,
                           BlobRow.hits, BlobRow.source, BlobRow.upstream).where(BlobRow.digest.in_(batch))
                )
            }
            scopes: dict[str, list[str]] = {}
            for batch in _batches(digests):
                for digest, scope in session.execute(
                    select(BlobScopeRow.digest, BlobScopeRow.scope).where(BlobScopeRow.digest.in_(batch))
                ):
                    scopes.setdefault(digest, []).append(scope)
            references = self._naming(session, digests, {ReadScope(s).name for found in scopes.values() for s in found})
        return SetContents(name, digests, records, {d: sorted(s) for d, s in scopes.items()}, references)

    def _naming(self, session: Session, digests: list[str], scope_names: set[str]) -> list[Reference]:
        """The references of the three rules, in (source, key) order."""
        chosen: dict[int, ReferenceRow] = {}
        wanted = {*digests, *(d.split(":", 1)[1] for d in digests)}
        while wanted:  # the second rule until no key names a hash not asked for yet
            found = self._rows(session, ReferenceRow.digest, wanted)
            new = [row for row in found if row.id not in chosen]
            chosen.update((row.id, row) for row in new)
            asked = wanted
            wanted = {word for row in new for word in named_hashes(row.key)} - asked
        for row in self._rows(session, ReferenceRow.key, scope_names):
            if row.digest == "":
                chosen[row.id] = row
        return sorted((_reference(row) for row in chosen.values()), key=lambda r: (r.source, r.key))

    @staticmethod
    def _rows(session: Session, column: object, values: Iterable[str]) -> list[ReferenceRow]:
        return [
            row for batch in _batches(sorted(values))
            for row in session.scalars(select(ReferenceRow).where(column.in_(batch)))  # type: ignore[attr-defined]
        ]

    def load(self, contents: SetContents) -> int:
        """Write a set's rows in one transaction: blob rows (kept where this index has one, taking
        a media type or origin it lacked), scopes, references (a name this index holds from a
        later answer keeps it: a bundle never turns a name back), and the set's pins, which become
        exactly these digests. The blob files must be in place already. Returns how many
        references were written."""
        now = time.time()
        blobs = [
            {"digest": r.digest, "size": r.size, "media_type": r.media_type, "created_at": now, "last_access": now, "hits": 0,
             "source": r.source, "upstream": r.upstream}
            for r in contents.records.values()
        ]
        add_blob = self._insert(BlobRow)
        unknown = BlobRow.source == "unknown"  # adopted by a sweep before this row arrived (as BlobIndex.add)
        add_blob = add_blob.on_conflict_do_update(index_elements=["digest"], set_={
            "media_type": func.coalesce(BlobRow.media_type, add_blob.excluded.media_type),
            "source": case((unknown, add_blob.excluded.source), else_=BlobRow.source),
            "upstream": case((unknown, add_blob.excluded.upstream), else_=BlobRow.upstream),
        })
        admissions = [{"digest": d, "scope": s, "created_at": now} for d, scopes in contents.scopes.items() for s in scopes]
        pins = [{"name": contents.name, "digest": d, "created_at": now} for d in dict.fromkeys(contents.digests)]
        written = 0
        with self.engine.begin() as connection:
            if blobs:
                connection.execute(add_blob, blobs)
            if admissions:
                connection.execute(self._insert(BlobScopeRow).on_conflict_do_nothing(index_elements=["digest", "scope"]), admissions)
            for ref in contents.references:
                written += connection.execute(self._put_unless_newer(ref)).rowcount or 0
            connection.execute(delete(PinRow).where(PinRow.name == contents.name))
            if pins:
                connection.execute(self._insert(PinRow).on_conflict_do_nothing(), pins)
        return written

    def _put_unless_newer(self, ref: Reference) -> object:
        values = {"source": ref.source, "key": ref.key, "digest": ref.digest, "fetched_at": ref.fetched_at,
                  "expires_at": ref.expires_at, "validators": dict(ref.validators), "meta": dict(ref.meta)}
        stmt = self._insert(ReferenceRow).values(**values)
        return stmt.on_conflict_do_update(
            index_elements=["source", "key"],
            set_={k: v for k, v in values.items() if k not in ("source", "key")},
            where=ReferenceRow.fetched_at < stmt.excluded.fetched_at,
        )


def _batches(values: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), IN_BATCH):
        yield values[start : start + IN_BATCH]
