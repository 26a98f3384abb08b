"""What an HF request names: repo type, repo id, revision and file path, checked before use.

Revisions arrive URL-quoted (`refs%2Fpr%2F1`) inside an otherwise plain path, so paths are split
on the raw bytes first and each part decoded once afterwards (proxy/http/paths.py): an encoded
"/" is a revision's own, anywhere else it is refused, as are dot segments and control characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from starlette.types import Scope

from proxy.http.paths import UnsafePath, decode_segment, quote_segments, raw_path
from proxy.sources.hf.errors import BadRequest

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_PATH = 1024


@dataclass(frozen=True, slots=True)
class Repo:
    type: str  # model, dataset, space
    id: str  # "org/name" or a legacy single name

    @property
    def api_kind(self) -> str:
        return f"{self.type}s"

    @property
    def url_prefix(self) -> str:
        """What precedes the id in resolve URLs: nothing for models."""
        return "" if self.type == "model" else f"{self.type}s/"

    @property
    def key(self) -> str:
        return f"{self.api_kind}/{self.id}"


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def raw_segments(scope: Scope) -> list[str]:
    """The path's segments, still quoted: each is decoded once by the parser that reads it."""
    return raw_path(scope).strip("/").split("/")


def parse_repo(repo_type: str, parts: list[str]) -> Repo:
    ids = [_decoded(p, "repository id") for p in parts]
    if not 1 <= len(ids) <= 2 or not all(_ID_PART.match(p) and ".." not in p and "--" not in p for p in ids):
        raise BadRequest("invalid repository id")
    return Repo(repo_type, "/".join(ids))


def parse_revision(part: str) -> str:
    """A branch, tag, commit or refs/pr/N: its "/" arrives encoded, and none of its parts may be a
    dot segment (the Hub decodes it before routing)."""
    revision = _decoded(part, "revision", slashes=True)
    if not revision or len(revision) > 256:
        raise BadRequest("invalid revision")
    return revision


def parse_file_path(parts: list[str]) -> str:
    segments = [_decoded(p, "file path") for p in parts]
    path = "/".join(segments)
    if not segments or len(path) > MAX_PATH or "" in segments:
        raise BadRequest("invalid file path")
    return path


def _decoded(raw: str, what: str, *, slashes: bool = False) -> str:
    try:
        return decode_segment(raw, slashes=slashes)
    except UnsafePath:
        raise BadRequest(f"invalid {what}") from None


def quote_revision(revision: str) -> str:
    return quote(revision, safe="")


def quote_path(path: str) -> str:
    """A checked file path for an upstream URL: each segment quoted, the separators kept."""
    return quote_segments(path.split("/"))
