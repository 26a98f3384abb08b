"""The HF mirror's pieces on their own: names, Xet stripping, link rewriting, git blob ids."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from proxy.sources.hf.api import absolute_links, mirror_links, strip_xet
from proxy.sources.hf.errors import BadRequest
from proxy.sources.hf.files import GitBlobCheck, normalize_etag
from proxy.store.blobs import DigestMismatch
from proxy.sources.hf.names import parse_file_path, parse_repo, parse_revision, raw_segments


def test_quoted_revision_stays_one_segment() -> None:
    segments = raw_segments({"raw_path": b"/acme/tiny/resolve/refs%2Fpr%2F1/sub/config.json", "path": ""})
    assert segments == ["acme", "tiny", "resolve", "refs%2Fpr%2F1", "sub", "config.json"]
    assert parse_revision(segments[3]) == "refs/pr/1"
    assert parse_file_path(segments[4:]) == "sub/config.json"


@pytest.mark.parametrize("parts", [["..", "x"], ["acme", ".."], ["a--b"], ["-lead"], ["a" * 97], ["a", "b", "c"], []])
def test_invalid_repo_ids_are_refused(parts: list[str]) -> None:
    with pytest.raises(BadRequest):
        parse_repo("model", parts)


@pytest.mark.parametrize("parts", [
    ["..", "etc", "passwd"], ["a", "%2e%2e", "b"], ["a", ""], ["a%00b"], ["a\\b"], ["a%5Cb"],
    ["x%2F..%2F..%2Facme%2Fprivate%2Fresolve%2Fmain%2Fconfig.json"], ["%2e"], ["a%ffb"],
])
def test_file_paths_cannot_climb_or_hide(parts: list[str]) -> None:
    with pytest.raises(BadRequest):
        parse_file_path(parts)


@pytest.mark.parametrize("raw", ["main%0aX-Injected: 1", "..", "%2e%2e", "refs%2F..%2Fmain", "refs%2Fpr%2F%2F1", ".", ""])
def test_revisions_refuse_control_characters_and_dot_parts(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_revision(raw)


def test_a_double_encoded_dot_segment_stays_a_literal_name_upstream() -> None:
    from proxy.sources.hf.names import quote_path

    path = parse_file_path(["a", "%252e%252e", "b"])  # decoded once: the literal name "%2e%2e"
    assert path == "a/%2e%2e/b" and quote_path(path) == "a/%252e%252e/b"


def test_xet_fields_are_removed_at_any_depth_and_lfs_is_kept() -> None:
    entry = {"path": "w.bin", "oid": "1" * 40, "lfs": {"oid": "2" * 64, "size": 3}, "xetHash": "abc"}
    assert strip_xet([entry, {"xetEnabled": True, "sha": "s"}]) == [
        {"path": "w.bin", "oid": "1" * 40, "lfs": {"oid": "2" * 64, "size": 3}},
        {"sha": "s"},
    ]


def test_pagination_links_come_back_to_the_mirror_and_xet_relations_go() -> None:
    upstream = "https://huggingface.co"
    header = f'<{upstream}/api/models/a/b/tree/main?cursor=xyz>; rel="next", <https://cas/auth>; rel="xet-auth"'
    relative = mirror_links(header, upstream)
    assert relative == '</api/models/a/b/tree/main?cursor=xyz>; rel="next"'
    assert absolute_links(relative, "http://mirror:5000/") == '<http://mirror:5000/api/models/a/b/tree/main?cursor=xyz>; rel="next"'


def test_the_git_blob_check_accepts_what_git_names_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = b"hello world\n"
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    check = GitBlobCheck(expected, len(data))
    check.update(data[:5])
    check.update(data[5:])  # the bytes arrive in parts
    check.verify(len(data))
    for wrong, size in ((b"hello world!", 12), (data, len(data) - 1)):
        bad = GitBlobCheck(expected, size)
        bad.update(wrong)
        with pytest.raises(DigestMismatch):
            bad.verify(len(wrong))
    plain = GitBlobCheck(hashlib.sha1(data).hexdigest(), len(data))  # a plain sha1 is not a git blob id
    plain.update(data)
    with pytest.raises(DigestMismatch):
        plain.verify(len(data))


def test_etags_lose_quotes_and_weakness() -> None:
    assert normalize_etag('W/"abc"') == "abc"
    assert normalize_etag('"abc"') == "abc"
    assert normalize_etag(None) == ""
