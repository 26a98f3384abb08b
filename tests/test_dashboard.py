"""The operators' dashboard, rendered by a real browser (headless Chromium) from a server that has
served traffic: the page must show the numbers /stats reports, and charts of the rates over time
with their axes, which survive a restart."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from sqlalchemy import create_engine, text

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


DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "dashboard.png"


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


def stats(pt) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return httpx.get(f"{pt.url}/stats", timeout=10).json()  # type: ignore[no-any-return]


def wait_for_point(pt, condition: Callable[[dict[str, Any]], bool], what: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """/stats' history once its newest point satisfies `condition` (points come every stats_interval)."""
    deadline = time.monotonic() + 60
    while True:
        history = stats(pt)["history"]
        if history and condition(history[-1]):
            return history  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no history point with {what}: {history[-3:]}"
        time.sleep(0.1)


def plotted(dom: str, series: str) -> list[tuple[float, float, float]]:
    """The steps a chart drew for `series`: (from t, to t, rate) each."""
    match = re.search(rf'<path [^>]*data-series="{re.escape(series)}"[^>]*data-segments="([^"]*)"', dom)
    assert match, f"no plotted series {series!r} in the rendered page"
    return [tuple(segment) for segment in json.loads(html.unescape(match.group(1)))]


def integral(segments: list[tuple[float, float, float]]) -> float:
    """What the plotted rates add up to over their intervals: the count they were computed from."""
    return sum(rate * (t1 - t0) for t0, t1, rate in segments)


def tick_labels(dom: str, chart: str, axis: str) -> list[str]:
    svg = re.search(rf'<svg [^>]*id="{chart}".*?</svg>', dom, re.S)
    assert svg, f"no chart #{chart}"
    group = re.search(rf'<g class="{axis}">(.*?)</g>', svg.group(0), re.S)
    assert group, f"chart #{chart} has no {axis}"
    return re.findall(r"<text[^>]*>([^<]*)</text>", group.group(1))


def test_a_fleet_sharing_an_index_keeps_one_history_point_per_slot_for_a_bounded_time(index_url) -> None:  # type: ignore[no-untyped-def]
    from proxy.store.index import Index, Sample, make_engine

    index = Index(make_engine(index_url))
    try:
        index.history.record(Sample(1_000_000, 1000.02, {"hits": 5}), keep_after=0)
        index.history.record(Sample(1_000_000, 1000.03, {"hits": 5, "misses": 1}), keep_after=0)  # another node, same slot
        index.history.record(Sample(1_010_000, 1010.01, {"hits": 9}), keep_after=0)
        assert index.history.since(0) == [Sample(1_000_000, 1000.02, {"hits": 5}), Sample(1_010_000, 1010.01, {"hits": 9})]
        assert index.history.since(1005) == [Sample(1_010_000, 1010.01, {"hits": 9})]
        index.history.record(Sample(1_020_000, 1020.0, {"hits": 9}), keep_after=1010)  # the window moves on
        assert [s.slot for s in index.history.since(0)] == [1_010_000, 1_020_000]
    finally:
        index.dispose()


def test_history_keeps_recent_points_all_and_older_ones_thinned_for_a_day() -> None:
    from proxy.stats import HISTORY_SECONDS, OLDER_STEP, RECENT_POINTS, RECENT_SECONDS, thin_history

    now = 10 * 24 * 3600.0
    points = [{"t": now - age, "hits": 0} for age in range(int(HISTORY_SECONDS) + 600, -1, -10)]
    kept = [now - p["t"] for p in thin_history(points, now)]
    assert max(kept) <= HISTORY_SECONDS
    assert [age for age in kept if age <= RECENT_SECONDS] == list(range(int(RECENT_SECONDS), -1, -10))
    older = [age for age in kept if age > RECENT_SECONDS]
    assert all(a - b >= OLDER_STEP for a, b in zip(older, older[1:])) and len(older) >= (HISTORY_SECONDS - RECENT_SECONDS) / OLDER_STEP - 1
    every_second = [{"t": now - age, "hits": 0} for age in range(int(RECENT_SECONDS), -1, -1)]  # stats_interval = 1s
    assert RECENT_POINTS - 1 <= len(thin_history(every_second, now)) <= RECENT_POINTS + 1


def test_dashboard_charts_rates_with_axes_and_keeps_them_across_a_restart(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    chromium = require_tool("chromium")
    pt = pullthrough(stats_interval="1s")
    wait_for_point(pt, lambda p: p["requests"] == 0, "no traffic yet")  # the charts start from nothing
    size = pull_blob(pt, upstream)  # a cold pull: a miss
    pull_blob(pt, upstream)  # and a hit
    wait_for_point(pt, lambda p: (p["hits"], p["misses"]) == (1, 1), "the cold pull")
    for _ in range(4):  # warm pulls only, in intervals of their own
        pull_blob(pt, upstream)
    history = wait_for_point(pt, lambda p: (p["hits"], p["misses"]) == (5, 1), "every pull")

    dom = render(chromium, f"{pt.url}/", tmp_path / "profile", "--window-size=1280,900", "--dump-dom").stdout
    assert 'data-loaded="1"' in dom, "the page's script never finished loading /stats"
    # Axes: clock times on x, units on y.
    for chart, unit in (("requests-chart", "req/s"), ("bytes-chart", "/s"), ("ratio-chart", "%")):
        labels = tick_labels(dom, chart, "y-ticks")
        assert len(labels) >= 3 and all(label.endswith(unit) for label in labels), (chart, labels)
        assert labels[0].startswith("0 "), (chart, labels)
        times = tick_labels(dom, chart, "x-ticks")
        assert times and all(re.fullmatch(r"\d\d:\d\d(:\d\d)?", t) for t in times), (chart, times)
    assert tick_labels(dom, "ratio-chart", "y-ticks")[-1] == "100 %"
    # The rates drawn add up to the traffic served: 5 hits, 1 miss, 5 blobs' bytes from the cache.
    hits, misses = plotted(dom, "hits"), plotted(dom, "misses")
    assert hits and all(rate >= 0 for _, _, rate in hits + misses)
    assert abs(integral(hits) - 5) < 1e-6 and abs(integral(misses) - 1) < 1e-6
    assert abs(integral(plotted(dom, "from cache")) - 5 * size) < 1e-3
    assert abs(integral(plotted(dom, "from upstream")) - size) < 1e-3
    ratios = [rate for _, _, rate in plotted(dom, "hits / requests")]
    assert max(ratios) == 100 and min(ratios) < 100  # the warm-only intervals, and the cold one

    pt.restart()  # same cache dir, same index
    kept = stats(pt)["history"]
    assert len(kept) >= len(history)
    assert {p["t"] for p in history} <= {p["t"] for p in kept}, "points from before the restart were lost"
    pull_blob(pt, upstream)  # traffic after the restart
    after = wait_for_point(pt, lambda p: p["hits"] == 6, "the pull after the restart")
    assert after[0]["t"] == history[0]["t"]

    dom = render(chromium, f"{pt.url}/", tmp_path / "profile2", "--window-size=1280,900", "--dump-dom").stdout
    hits = plotted(dom, "hits")
    assert all(rate >= 0 for _, _, rate in hits)  # the restart is no counter reset
    assert len(hits) >= len(history) - 1  # the points before the restart are drawn
    assert abs(integral(hits) - 6) < 1e-6

    shot = tmp_path / "dashboard.png"
    taken = render(chromium, f"{pt.url}/", tmp_path / "profile3", f"--screenshot={shot}", "--window-size=1280,900")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000
    if os.environ.get("PULLTHROUGH_UPDATE_SCREENSHOT") == "1":  # how docs/dashboard.png is made
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    # Counters that start again from zero (an operator emptied them) are no negative rate.
    pt.stop()
    engine = create_engine(pt.database_url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM counters"))
    engine.dispose()
    pt.restart()
    wait_for_point(pt, lambda p: p["hits"] == 0, "the emptied counters")
    pull_blob(pt, upstream)
    wait_for_point(pt, lambda p: p["hits"] == 1, "the pull after emptying the counters")
    dom = render(chromium, f"{pt.url}/", tmp_path / "profile4", "--window-size=1280,900", "--dump-dom").stdout
    hits = plotted(dom, "hits")
    assert all(rate >= 0 for _, _, rate in hits)
    assert abs(integral(hits) - 7) < 1e-6  # 6 before, 1 after: the drop itself is drawn as nothing
