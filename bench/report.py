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

COLUMNS = [("pullthrough", "pullthrough"), ("pullthrough-drop", "pullthrough, drop_behind"),
           ("distribution", "distribution proxy"), ("nginx", "nginx"), ("upstream", "upstream direct")]


@dataclass
class Results:
    size: int
    reps: int
    clients: int
    proxies: list[str]
    environment: dict[str, str]
    warm_clients: int = 32
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


Values = dict[str, float | None]  # one row's medians by column key


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    fmt: str
    aggregate: Callable[[list[float]], float] = median
    target: str = ""
    # the row's values by column -> met?; None when there is no target
    check: Callable[[Values], bool] | None = None
    nginx_ratio: bool = False
    upstream_ratio: bool = False


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _at_most(times: float, reference: str) -> Callable[[Values], bool]:
    return lambda v: (r := _ratio(v["pullthrough"], v[reference])) is not None and r <= times


def _at_least(times: float, reference: str) -> Callable[[Values], bool]:
    return lambda v: (r := _ratio(v["pullthrough"], v[reference])) is not None and r >= times


def _both(*checks: Callable[[Values], bool]) -> Callable[[Values], bool]:
    return lambda v: all(check(v) for check in checks)


def _pt(predicate: Callable[[float], bool]) -> Callable[[Values], bool]:
    return lambda v: v["pullthrough"] is not None and predicate(v["pullthrough"])


# Issue 12 measured the cached manifest by digest at 0.155x nginx's rate; its target is twice that.
MANIFEST_NGINX_BASELINE = 0.155


def rows(size_label: str, clients: int, warm_clients: int) -> list[Row]:
    return [
        Row("warm_s", f"warm {size_label} GET (s)", "{:.3f}", target="≤ 1.1× distribution",
            check=_at_most(1.1, "distribution"), nginx_ratio=True),
        Row("warm_many_mibps", f"warm: {warm_clients} concurrent GETs, aggregate (MiB/s)", "{:.0f}",
            target="≥ 0.9× nginx", check=_at_least(0.9, "nginx"), nginx_ratio=True),
        Row("cold_s", f"cold {size_label} GET (s)", "{:.3f}", target="≤ 0.8× distribution, ≤ 1.25× direct",
            check=_both(_at_most(0.8, "distribution"), _at_most(1.25, "upstream")), upstream_ratio=True),
        Row("cold_ttfb_s", "cold GET, time to first byte (s)", "{:.3f}"),
        Row("cold_upstream_gets", "upstream GETs per cold GET (max)", "{:.0f}", aggregate=max, target="1",
            check=_pt(lambda pt: pt == 1)),
        Row("cold_upstream_bytes", "upstream bytes per cold GET (× blob)", "{:.2f}", aggregate=max, target="1.00×",
            check=_pt(lambda pt: pt <= 1.01)),
        Row("concurrent_wall_s", f"{clients} concurrent cold GETs, wall (s)", "{:.3f}"),
        Row("concurrent_over_single", f"{clients} concurrent cold GETs ÷ one cold GET", "{:.2f}",
            target="≤ 1.15", check=_pt(lambda pt: pt <= 1.15)),
        Row("concurrent_upstream_gets", f"{clients} concurrent cold GETs, upstream GETs (max)", "{:.0f}",
            aggregate=max, target="1", check=_pt(lambda pt: pt == 1)),
        Row("concurrent_upstream_bytes", f"{clients} concurrent cold GETs, upstream bytes (× blob, max)", "{:.2f}",
            aggregate=max),
        Row("manifest_digest_rps", "cached manifest by digest (req/s)", "{:.0f}",
            target=f"≥ {2 * MANIFEST_NGINX_BASELINE:.2f}× nginx", check=_at_least(2 * MANIFEST_NGINX_BASELINE, "nginx"),
            nginx_ratio=True),
        Row("manifest_digest_upstream_per_1k", "upstream requests per 1000 cached by-digest requests", "{:.1f}",
            target="0", check=_pt(lambda pt: pt == 0)),
        Row("manifest_tag_rps", "cached manifest by tag (req/s)", "{:.0f}"),
        Row("manifest_tag_upstream_per_1k", "upstream requests per 1000 cached by-tag requests", "{:.1f}",
            target="0 (inside tag_ttl)", check=_pt(lambda pt: pt == 0)),
        Row("idle_rss_mib", "idle RSS after start, VmRSS (MiB)", "{:.1f}", target="≤ 64 MiB",
            check=_pt(lambda pt: pt <= 64)),
        Row("concurrent_peak_rss_mib", f"peak RSS during {clients} concurrent cold GETs (MiB)", "{:.1f}",
            aggregate=max, target="≤ 128 MiB", check=_pt(lambda pt: pt <= 128)),
        Row("peak_rss_mib", "peak RSS over the whole run, VmHWM (MiB)", "{:.1f}", aggregate=max),
    ]


def _size_label(size: int) -> str:
    return f"{size / 2**30:.0f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def table(results: Results) -> tuple[list[str], list[list[str]]]:
    # A variant that was not measured gets no column (the references always have one: they are
    # measured in every run, and "—" under distribution says it was left out).
    columns = [(key, label) for key, label in COLUMNS if key != "pullthrough-drop" or key in results.proxies]
    header = ["metric"] + [label for _, label in columns] + ["pullthrough ÷ distribution", "pullthrough ÷ nginx",
                                                            "pullthrough ÷ direct", "target", "met"]
    body = []
    for row in rows(_size_label(results.size), results.clients, results.warm_clients):
        cells = [row.label]
        values = {key: results.get(row.metric, key, row.aggregate) for key, _ in columns}
        if all(v is None for v in values.values()):
            continue
        cells += ["—" if values[key] is None else row.fmt.format(values[key]) for key, _ in columns]
        pt, dist = values["pullthrough"], values["distribution"]
        ratio = _ratio(pt, dist)
        cells.append("—" if ratio is None else f"{ratio:.2f}×")
        nginx = _ratio(pt, values["nginx"]) if row.nginx_ratio else None
        cells.append("—" if nginx is None else f"{nginx:.2f}×")
        direct = _ratio(pt, values["upstream"]) if row.upstream_ratio else None
        cells.append("—" if direct is None else f"{direct:.2f}×")
        cells.append(row.target or "—")
        if row.check is None or pt is None:
            cells.append("—")
        else:
            cells.append("yes" if row.check(values) else "**no**")
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
        "- *direct*: a GET straight from the upstream registry in the same repetition (the wire's speed).",
        f"- *{results.clients} concurrent*: {results.clients} curls started together against a cold cache; "
        "wall time until the last body ends, and its ratio to the same server's single cold GET of that repetition.",
        f"- *warm, {results.warm_clients} concurrent*: {results.warm_clients} curls of the cached blob at once; "
        "bytes delivered to all of them per second of wall time.",
        "- *idle RSS*: VmRSS of the server's process group a second after each (re)start, before any request.",
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
