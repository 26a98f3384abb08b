"""What an HF request names: repo type, repo id, revision and file path, checked before use.

Revisions arrive URL-quoted (`refs%2Fpr%2F1`) inside an otherwise plain path, so paths are split
on the raw bytes first and each part unquoted afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

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


def raw_segments(raw_path: bytes) -> list[str]:
    """The path's segments, still quoted."""
    return raw_path.decode("latin-1").split("?", 1)[0].strip("/").split("/")


def parse_repo(repo_type: str, parts: list[str]) -> Repo:
    ids = [unquote(p) for p in parts]
    if not 1 <= len(ids) <= 2 or not all(_ID_PART.match(p) and ".." not in p and "--" not in p for p in ids):
        raise BadRequest("invalid repository id")
    return Repo(repo_type, "/".join(ids))


def parse_revision(part: str) -> str:
    revision = unquote(part)
    if not revision or len(revision) > 256 or any(ord(c) < 0x20 or c == "\x7f" for c in revision):
        raise BadRequest("invalid revision")
    return revision


def parse_file_path(parts: list[str]) -> str:
    segments = [unquote(p) for p in parts]
    path = "/".join(segments)
    if (
        not segments
        or len(path) > MAX_PATH
        or any(s in ("", ".", "..") or "\\" in s or "\x00" in s for s in segments)
    ):
        raise BadRequest("invalid file path")
    return path


def quote_revision(revision: str) -> str:
    return quote(revision, safe="")


def quote_path(path: str) -> str:
    return quote(path, safe="/")
