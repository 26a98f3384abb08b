"""Collected measurements and the results table: medians per server, ratios against the references
measured in the same run, and whether each target of issue 2 is met."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from bench.measure import cpu_count, median

COLUMNS = [("pullthrough", "pullthrough"), ("distribution", "distribution proxy"), ("nginx", "nginx"),
           ("upstream", "upstream direct")]


@dataclass
class Results:
    size: int
    reps: int
    clients: int
    proxies: list[str]
    environment: dict[str, str]
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, metric: str, target: str, value: float) -> None:
        self.values[metric][target].append(value)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def get(self, metric: str, target: str, aggregate: Callable[[list[float]], float] = median) -> float | None:
        values = self.values.get(metric, {}).get(target)
        return aggregate(values) if values else None


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    fmt: str
    aggregate: Callable[[list[float]], float] = median
    target: str = ""
    # (pullthrough, distribution) -> met?; None when there is no target
    check: Callable[[float, float | None], bool] | None = None
    nginx_ratio: bool = False


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(size_label: str, clients: int) -> list[Row]:
    return [
        Row("warm_s", f"warm {size_label} GET (s)", "{:.3f}", target="≤ 1.1× distribution",
            check=lambda pt, d: d is not None and pt <= 1.1 * d, nginx_ratio=True),
        Row("cold_s", f"cold {size_label} GET (s)", "{:.3f}", target="≤ 1.0× distribution",
            check=lambda pt, d: d is not None and pt <= d),
        Row("cold_ttfb_s", "cold GET, time to first byte (s)", "{:.3f}"),
        Row("cold_upstream_gets", "upstream GETs per cold GET (max)", "{:.0f}", aggregate=max, target="1",
            check=lambda pt, d: pt == 1),
        Row("cold_upstream_bytes", "upstream bytes per cold GET (× blob)", "{:.2f}", aggregate=max, target="1.00×",
            check=lambda pt, d: pt <= 1.01),
        Row("concurrent_wall_s", f"{clients} concurrent cold GETs, wall (s)", "{:.3f}"),
        Row("concurrent_upstream_gets", f"{clients} concurrent cold GETs, upstream GETs (max)", "{:.0f}",
            aggregate=max, target="1", check=lambda pt, d: pt == 1),
        Row("concurrent_upstream_bytes", f"{clients} concurrent cold GETs, upstream bytes (× blob, max)", "{:.2f}",
            aggregate=max),
        Row("manifest_digest_rps", "cached manifest by digest (req/s)", "{:.0f}", target="≥ 3× distribution",
            check=lambda pt, d: d is not None and pt >= 3 * d, nginx_ratio=True),
        Row("manifest_digest_upstream_per_1k", "upstream requests per 1000 cached by-digest requests", "{:.1f}",
            target="0", check=lambda pt, d: pt == 0),
        Row("manifest_tag_rps", "cached manifest by tag (req/s)", "{:.0f}"),
        Row("manifest_tag_upstream_per_1k", "upstream requests per 1000 cached by-tag requests", "{:.1f}",
            target="0 (inside tag_ttl)", check=lambda pt, d: pt == 0),
        Row("peak_rss_mib", "peak RSS, VmHWM (MiB)", "{:.1f}", aggregate=max, target="< 200 MiB",
            check=lambda pt, d: pt < 200),
    ]


def _size_label(size: int) -> str:
    return f"{size / 2**30:.0f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + [label for _, label in COLUMNS] + ["pullthrough ÷ distribution", "pullthrough ÷ nginx",
                                                            "target", "met"]
    body = []
    for row in rows(_size_label(results.size), results.clients):
        cells = [row.label]
        values = {key: results.get(row.metric, key, row.aggregate) for key, _ in COLUMNS}
        if all(v is None for v in values.values()):
            continue
        cells += ["—" if values[key] is None else row.fmt.format(values[key]) for key, _ in COLUMNS]
        pt, dist = values["pullthrough"], values["distribution"]
        ratio = _ratio(pt, dist)
        cells.append("—" if ratio is None else f"{ratio:.2f}×")
        nginx = _ratio(pt, values["nginx"]) if row.nginx_ratio else None
        cells.append("—" if nginx is None else f"{nginx:.2f}×")
        cells.append(row.target or "—")
        if row.check is None or pt is None:
            cells.append("—")
        else:
            cells.append("yes" if row.check(pt, dist) else "**no**")
        body.append(cells)
    return header, body


def text_table(header: list[str], body: list[list[str]], notes: list[str]) -> str:
    """Columns padded to their widest cell (the first left-aligned), then one line per note."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body] + notes)


def render_text(results: Results) -> str:
    return text_table(*table(results), [f"note: {n}" for n in results.notes])


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def render_markdown(results: Results, when: datetime.datetime) -> str:
    header, body = table(results)
    size = _size_label(results.size)
    parts = [
        "# pullthrough benchmark",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC, `python -m bench`: one {size} single-layer image ({results.size} bytes, "
        f"gzip level 0) on a local docker-registry upstream; medians of {results.reps} repetition(s) unless "
        f"marked max; every reference measured in the same run. Ran {results.elapsed:.0f} s.",
        "",
        _markdown_table(header, body),
        "",
        "- *cold*: the cache is wiped and the server restarted before every cold GET; times are curl's "
        "`time_total` with the body discarded.",
        "- *upstream GETs / bytes*: counted from the upstream registry's access log once the cache has "
        "committed the blob and the log has been quiet for a second (background fetches included).",
        f"- *{results.clients} concurrent*: {results.clients} curls started together against a cold cache; "
        "wall time until the last body ends.",
        "- *manifest rates*: wrk, 1 thread, keep-alive connections, on loopback, after one GET has cached "
        "the manifest; nginx serves the same manifest bytes as a static file.",
        "- *peak RSS*: VmHWM of the server's process group, the maximum over every instance started.",
    ]
    if results.notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in results.notes]
    parts += ["", "## Every repetition", "", "| metric | server | values |", "| --- | --- | --- |"]
    for metric, by_target in results.values.items():
        for target, values in by_target.items():
            parts.append(f"| {metric} | {target} | {', '.join(f'{v:.3f}' for v in values)} |")
    parts += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in results.environment.items()]
    return "\n".join(parts) + "\n"


def _version(argv: list[str], pattern: str = r"[\d]+\.[\d.]+") -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    match = re.search(pattern, result.stdout + result.stderr)
    return match[0] if match else "unknown"


def environment() -> dict[str, str]:
    mem = "unknown"
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", open("/proc/meminfo").read())
        mem = f"{int(match[1]) / 2**20:.1f} GiB" if match else mem
    except OSError:
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _version(["git", "-C", repo, "rev-parse", "--short", "HEAD"], r"^[0-9a-f]{7,}")
    changed = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "proxy", "pyproject.toml"],
                             capture_output=True, text=True).stdout.strip()
    if changed:
        commit += f" + uncommitted changes to {len(changed.splitlines())} file(s) under proxy/"
    return {
        "cpus": str(cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pullthrough commit": commit,
        "docker-registry": _version(["docker-registry", "--version"]),
        "nginx": _version(["nginx", "-v"]),
        "curl": _version(["curl", "--version"]),
        "wrk": _version(["wrk", "--version"]),
    }
