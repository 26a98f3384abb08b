"""The operators' dashboard, rendered by a real browser (headless Chromium) from a server that has
served traffic: the page must show the numbers /stats reports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from tests.conftest import require_tool
from tests.test_lifecycle import pull_blob

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]


def render(chromium: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=120,
    )


def cell(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id} in the rendered page"
    return match.group(1)


def test_dashboard_renders_the_served_traffic_in_a_real_browser(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    chromium = require_tool("chromium")
    pt = pullthrough()
    size = pull_blob(pt, upstream)  # a miss
    pull_blob(pt, upstream)  # and a hit
    pull_blob(pt, upstream)  # and another
    stats = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert (stats["hits"], stats["misses"]) == (2, 1)

    page = render(chromium, f"{pt.url}/", tmp_path / "profile", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    dom = page.stdout
    assert 'data-loaded="1"' in dom, "the page's script never finished loading /stats"
    assert cell(dom, "hits") == "2"
    assert cell(dom, "misses") == "1"
    assert cell(dom, "hit-ratio") == "66.7 %"
    assert 1024 <= 2 * size < 1024 * 1024  # so the page shows KiB with one decimal
    assert cell(dom, "bytes-from-cache") == f"{2 * size / 1024:.1f} KiB"
    assert "oci:docker.io/library/single" in dom  # top repositories
    assert "oci:docker.io" in dom  # upstream health table

    shot = tmp_path / "dashboard.png"
    taken = render(chromium, f"{pt.url}/", tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,900")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000
