"""/metrics as Prometheus expects it from a running `pullthrough serve`: every request timed by route
family and cache result (the /v2/ ping and the manifest hot path included), bytes served split by
hit and miss, build and process metrics, the cache's limits, no `_created` series, and the
`public_stats` switch."""

from __future__ import annotations

import hashlib
import platform
import time
from collections import Counter

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy import __version__

pytestmark = pytest.mark.real

MAX_SIZE = 3_000_000_000
MIN_FREE = 1_000_000
ADMIN = "s3cret-admin"


def wait_until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, list[Sample]]:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text[:300]
    samples = [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]
    return response, samples


def values(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Each sample of `name` by its labels (sorted (name, value) pairs)."""
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def test_every_request_is_timed_by_family_and_cache_result_and_served_bytes_split_by_hit_and_miss(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(max_size=MAX_SIZE, min_free=MIN_FREE)
    image = upstream.images["library/single:1"]
    blob = f"/v2/library/single/blobs/{image.layers[0].digest}"
    manifest = f"/v2/library/single/manifests/{image.manifest_digest}"
    made: Counter[tuple[str, str]] = Counter()
    served: Counter[str] = Counter()
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        assert http.get("/v2/").status_code == 200
        made[("oci", "none")] += 1
        for path, outcome in ((blob, "miss"), (blob, "hit"), (manifest, "miss"), (manifest, "hit"), (manifest, "hit")):
            response = http.get(path)
            assert response.status_code == 200, (path, response.text[:300])
            made[("oci", outcome)] += 1
            served[outcome] += len(response.content)
            if path == blob and outcome == "miss":  # the next GET is a hit once the file is committed
                wait_until(pt.blob_path("sha256:" + hashlib.sha256(response.content).hexdigest()).exists, "blob committed")
        # The third manifest GET was answered by the hot path (proxy/sources/oci/hot.py), before routing.

        def fill_done() -> bool:  # the blob's fill task ends a moment after its file appears
            running = values(scrape(pt.url)[1], "pullthrough_fills_in_progress")
            return running.get((("source", "oci"), ("upstream", "docker.io"))) == 0

        wait_until(fill_done, "the fill counted as begun and ended")
        response, samples = scrape(pt.url)

    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    counts = values(samples, "pullthrough_request_duration_seconds_count")
    timed = {(family, result): counts.get((("family", family), ("result", result)), 0.0)
             for family in ("oci",) for result in ("hit", "miss", "none")}
    assert timed == {key: float(made[key]) for key in timed}
    buckets = values(samples, "pullthrough_request_duration_seconds_bucket")
    assert buckets[(("family", "oci"), ("le", "+Inf"), ("result", "hit"))] == made[("oci", "hit")]

    bytes_served = values(samples, "pullthrough_served_bytes_total")
    by_result = {result: bytes_served.get((("result", result), ("source", "oci"), ("upstream", "docker.io")), 0.0)
                 for result in ("hit", "miss")}
    blob_size, manifest_size = image.layers[0].size, len(httpx.get(pt.url + manifest).content)
    assert by_result == {"hit": float(blob_size + 2 * manifest_size), "miss": float(blob_size + manifest_size)}
    assert by_result == {result: float(served[result]) for result in by_result}

    assert values(samples, "pullthrough_build_info") == {(("python", platform.python_version()), ("version", __version__)): 1.0}
    assert not [s.name for s in samples if s.name.endswith("_created")]
    assert values(samples, "process_resident_memory_bytes")[()] > 0
    assert values(samples, "process_open_fds")[()] > 0
    assert values(samples, "pullthrough_cache_max_bytes")[()] == MAX_SIZE
    assert values(samples, "pullthrough_cache_min_free_bytes")[()] == MIN_FREE
    assert values(samples, "pullthrough_filesystem_free_bytes")[()] > 0
    assert values(samples, "pullthrough_cache_bytes")[()] >= blob_size + manifest_size


def test_a_cache_without_max_size_exports_no_maximum(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    _, samples = scrape(pullthrough().url)
    names = {s.name for s in samples}
    assert {"pullthrough_cache_bytes", "pullthrough_filesystem_free_bytes"} <= names
    assert "pullthrough_cache_max_bytes" not in names and "pullthrough_cache_min_free_bytes" not in names


def test_metrics_need_the_admin_token_when_stats_are_not_public(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    closed = pullthrough(admin_token=ADMIN, public_stats=False)
    refused = httpx.get(f"{closed.url}/metrics", timeout=10)
    assert refused.status_code == 401
    assert "pullthrough_" not in refused.text
    _, samples = scrape(closed.url, {"Authorization": f"Bearer {ADMIN}"})
    assert any(s.name == "pullthrough_build_info" for s in samples)
