"""The Hugging Face benchmark: `snapshot_download` of a ~100 MiB model through pullthrough, through
Olah, and straight from a fake Hub, warm and cold, in one run; the table goes to stdout and
bench/results/hf-latest.md.

    python -m bench.hf            # 2 x 48 MiB shards + json files, 3 repetitions (medians)
    python -m bench.hf --quick    # 2 x 8 MiB shards, 1 repetition: a smoke run
    python -m bench --hf          # the same command through the main entry point
    python -m bench.hf --xet      # the Xet benchmark instead (bench/hfxet.py): hf_xet direct vs through pullthrough
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python bench/hf.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.hfclient import client_env, empty_home, run_client, wait_quiet  # noqa: E402
from bench.measure import peak_rss_bytes  # noqa: E402
from bench.report import text_table  # noqa: E402
from tests.servers import fake_hub as fake_hub_module  # noqa: E402
from tests.servers.fake_hub import FakeHub  # noqa: E402
from tests.servers.ports import (free_port, start_process, stop_all_processes, stop_process,  # noqa: E402
                                 wait_http, wait_port_closed)
from tests.servers.pullthrough import Pullthrough, render_config, toml_value  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ID = "bench-org/bench-model"
SEED = 1
MIRRORS = ("pullthrough", "olah", "direct")
LABELS = {"pullthrough": "pullthrough", "olah": "Olah", "direct": "fake Hub direct"}
#: The Hub keeps files above 10 MB (and binary suffixes) in LFS; the fake Hub's default is 64 KiB.
HUB_LFS_THRESHOLD = 10 * 1000 * 1000


def log(message: str) -> None:
    print(f"[bench.hf {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 8 MiB shards, 1 repetition")
    parser.add_argument("--shard-mib", type=int, help="size of each of the 2 safetensors shards (default 48)")
    parser.add_argument("--reps", type=int, help="repetitions of every measurement (default 3); medians are reported")
    parser.add_argument("--mirrors", default=",".join(MIRRORS),
                        help="comma-separated subset of pullthrough, olah, direct")
    parser.add_argument("--olah-lfs-netloc",
                        help="Olah's --hf-lfs-netloc (default: the fake CDN's 127.0.0.1:PORT)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one snapshot_download may take")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / ".work" / "hf",
                        help="run state: caches, client homes, logs (wiped at the start of a run)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "hf-latest.md")
    args = parser.parse_args(argv)
    args.shard_mib = args.shard_mib or (8 if args.quick else 48)
    args.reps = args.reps or (1 if args.quick else 3)
    args.mirrors = [name.strip() for name in args.mirrors.split(",") if name.strip()]
    unknown = set(args.mirrors) - set(MIRRORS)
    if unknown:
        parser.error(f"unknown mirrors: {', '.join(sorted(unknown))}")
    return args


# -- the model --------------------------------------------------------------------------------------


def safetensors_shard(rng: random.Random, size: int, name: str) -> bytes:
    """A valid safetensors file of exactly `size` bytes: one U8 tensor of seeded random bytes."""
    header = b""
    for _ in range(3):  # the header's length depends on the payload length it names
        payload = size - 8 - len(header)
        text = json.dumps({"__metadata__": {"format": "pt"},
                           name: {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}})
        header = text.encode().ljust((len(text) + 7) // 8 * 8)
    payload = size - 8 - len(header)
    return len(header).to_bytes(8, "little") + header + rng.randbytes(payload)


def build_model(shard_mib: int, tokenizer_kib: int) -> dict[str, bytes]:
    """Seeded, byte-identical every run: two LFS shards and the json files a transformers model has."""
    rng = random.Random(SEED)
    shards = {f"model-0000{i}-of-00002.safetensors": safetensors_shard(rng, shard_mib * 2**20 - i * 4096,
                                                                      f"layers.{i}.weight")
              for i in (1, 2)}
    vocab: dict[str, int] = {}
    length = 0
    while length < tokenizer_kib * 1024:  # about the size of the json text, counted as it grows
        token = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        if token not in vocab:
            vocab[token] = len(vocab)
            length += len(token) + len(str(vocab[token])) + 6
    files = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlicense: apache-2.0\n---\n# bench-model\n\nSeeded random weights for pullthrough's benchmark.\n",
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
                                   "num_hidden_layers": 2, "vocab_size": len(vocab),
                                   "torch_dtype": "bfloat16"}, indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2).encode(),
        "model.safetensors.index.json": json.dumps({
            "metadata": {"total_size": sum(len(d) for d in shards.values())},
            "weight_map": {f"layers.{i}.weight": name for i, name in enumerate(shards, 1)}}, indent=2).encode(),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                             "model_max_length": 4096}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}).encode(),
    }
    files.update(shards)
    return files


# -- the fake Hub -----------------------------------------------------------------------------------


class _BenchHandler(fake_hub_module._Handler):
    """The fake Hub's handler with TCP_NODELAY, as any production server has: http.server leaves Nagle on and
    writes headers and body in two sends, so on a reused connection every response with a body waited ~40 ms
    for the client's delayed ACK (httpx and urllib3 reuse connections; curl's fresh ones never showed it).

    With `head_api` it also answers HEAD on /api/... routes as GET without a body, as huggingface.co does:
    Olah checks a repo exists with `HEAD /api/models/{repo}`."""

    disable_nagle_algorithm = True
    head_api = False
    _bench_head = False

    def _dispatch(self):
        self._bench_head = False  # one handler serves every request of a keep-alive connection
        super()._dispatch()

    def _api_route(self, segments):
        if self.command == "HEAD" and self.head_api:
            self.command, self._bench_head = "GET", True
        super()._api_route(segments)

    def _send(self, reply):
        if self._bench_head:
            self.command, self._bench_head = "HEAD", False
        super()._send(reply)


class _HeadApiHandler(_BenchHandler):
    head_api = True


class BenchHub(FakeHub):
    """The fake Hub of tests/servers/fake_hub.py, unchanged in what it answers, with TCP_NODELAY (see above).
    (FakeFile itself computes each digest once.)"""

    def use_handler(self, handler: type) -> None:
        for server in self._servers:  # socketserver looks the class up for every connection
            server.RequestHandlerClass = handler


def start_hub(workdir: Path, files: dict[str, bytes], notes: list[str]) -> FakeHub:
    hub = BenchHub.start(workdir, lfs_threshold=HUB_LFS_THRESHOLD)
    hub.use_handler(_BenchHandler)
    hub.add_repo(REPO_ID, files=files)
    notes.append("the fake Hub runs with TCP_NODELAY and computes each file's digests once (see bench/README.md); "
                 "what it answers is unchanged.")
    head = httpx.head(f"{hub.url}/api/models/{REPO_ID}", timeout=10).status_code
    get = httpx.get(f"{hub.url}/api/models/{REPO_ID}", timeout=10).status_code
    if head != get:
        hub.use_handler(_HeadApiHandler)
        notes.append(f"the fake Hub answers `HEAD /api/models/{{repo}}` with {head} (GET: {get}); huggingface.co "
                     "answers it like GET, and Olah refuses every repo without it (401 RepoNotFound to the "
                     "client), so this run answered HEAD on /api/ routes like GET without a body.")
    return hub


# -- the mirrors ------------------------------------------------------------------------------------


class Mirror:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.peak_rss = 0

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None

    def record_rss(self) -> None:
        if self.pid is not None:
            self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.pid))

    def fresh(self) -> None:
        """Stop, wipe the cache, start again: the next snapshot is cold."""

    def stop(self) -> None:
        pass


class Direct(Mirror):
    name = "direct"

    def __init__(self, workdir: Path, hub: FakeHub) -> None:
        super().__init__(workdir)
        self.hub = hub

    @property
    def url(self) -> str:
        return self.hub.url


class PullthroughMirror(Mirror):
    """`pullthrough serve` with an `[hf]` table (tests/servers/pullthrough.py writes only
    `[[registries]]`, so the TOML is written here and launched through the same helper)."""

    name = "pullthrough"

    def __init__(self, workdir: Path, hub: FakeHub, hf_settings: dict[str, object] | None = None) -> None:
        super().__init__(workdir)
        self.cache_dir = workdir / "pullthrough-cache"
        port = free_port()
        text = render_config({"listen": f"127.0.0.1:{port}", "cache_dir": str(self.cache_dir)}, [])
        text += f"\n[hf]\nurl = {toml_value(hub.url)}\n"
        text += "".join(f"{key} = {toml_value(value)}\n" for key, value in (hf_settings or {}).items())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
        run_dir = workdir / "pullthrough-run"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.server = Pullthrough(self.cache_dir, port, text, run_dir, env)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def fresh(self) -> None:
        self.record_rss()
        self.server.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.server._launch()

    def stop(self) -> None:
        self.record_rss()
        self.server.stop()


class OlahMirror(Mirror):
    """`olah-cli` pointed at the fake Hub and its CDN, its cache in `repos-path`."""

    name = "olah"

    def __init__(self, workdir: Path, hub: FakeHub, lfs_netloc: str | None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.repos = workdir / "olah-repos"
        self.run_dir = workdir / "olah-run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "olah.log"
        me = f"127.0.0.1:{self.port}"
        self.argv = ["olah-cli", "--host", "127.0.0.1", "--port", str(self.port),
                     "--hf-scheme", "http", "--hf-netloc", urlsplit(hub.url).netloc,
                     "--hf-lfs-netloc", lfs_netloc or urlsplit(hub.cdn_url).netloc,
                     "--mirror-scheme", "http", "--mirror-netloc", me, "--mirror-lfs-netloc", me,
                     "--repos-path", str(self.repos), "--log-path", str(self.run_dir / "logs")]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _launch(self) -> None:
        executable = shutil.which("olah-cli")
        if executable is None:
            raise RuntimeError("olah-cli not found: pip install olah")
        with open(self.log_path, "ab") as out:
            self.proc = start_process(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.run_dir)
        wait_http(self.url + "/", timeout=60, proc=self.proc, log_path=self.log_path)  # any status: it is up

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.repos, ignore_errors=True)
        self._launch()

    def stop(self) -> None:
        self.record_rss()
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            wait_port_closed(self.port)


# -- one snapshot -----------------------------------------------------------------------------------

@dataclass
class Snapshot:
    seconds: float
    process_seconds: float
    verified: bool
    problem: str
    upstream_requests: int
    upstream_downloads: int
    upstream_bytes: int
    cdn_gets: int


def range_length(header: str | None, size: int) -> int:
    if not header or not header.startswith("bytes="):
        return size
    first, _, last = header[len("bytes="):].split(",")[0].strip().partition("-")
    try:
        if first == "":
            return min(int(last), size)
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        return max(end - start + 1, 0)
    except ValueError:
        return size


def run_snapshot(mirror: Mirror, hub: FakeHub, files: dict[str, bytes], expected: dict[str, str], home: Path,
                 timeout: float) -> Snapshot:
    with empty_home(home):
        hub.reset_hits()
        run = run_client(client_env(mirror.url, home), timeout, REPO_ID)
        wait_quiet(lambda: len(hub.hits()), quiet=1.0)
        hits = hub.hits()
        downloads = [h for h in hits if h.method == "GET" and h.status in (200, 206)
                     and h.kind in ("resolve", "resolve-cache", "lfs", "xet-bridge")]
        upstream_bytes = sum(range_length(h.range, len(files.get(h.path or "", b""))) for h in downloads)
        cdn_gets = sum(1 for h in hits if h.host == "cdn" and h.method == "GET")
        verified, problem = run.check(expected)
    return Snapshot(run.seconds, run.process_seconds, verified, problem, len(hits), len(downloads), upstream_bytes,
                    cdn_gets)


def probe(mirror: Mirror, files: dict[str, bytes], name: str) -> str:
    """How the mirror answers the client's first request for an LFS file, redirects not followed."""
    url = f"{mirror.url}/{REPO_ID}/resolve/main/{name}"
    try:
        with httpx.Client(timeout=60, follow_redirects=False) as client:
            head = client.head(url)
            get = client.get(url)
    except httpx.HTTPError as exc:
        return f"{name}: {exc!r}"
    served = "the file's bytes" if get.content == files[name] else f"{len(get.content)} other bytes"
    location = get.headers.get("location")
    return (f"HEAD → {head.status_code}" + (f" Location {head.headers['location'][:60]}…" if "location" in head.headers else "")
            + f", X-Linked-Size {head.headers.get('x-linked-size', '—')}, ETag {head.headers.get('etag', '—')[:16]}…"
            + f"; GET → {get.status_code}" + (f" Location {location[:60]}…" if location else f" with {served}"))


# -- results ----------------------------------------------------------------------------------------

# The first helpers serve hfxet.py too: medians that skip failed runs, markdown tables, the report's end.


def aggregate_runs(values: list[float], aggregate: Callable[[list[float]], float] = statistics.median) -> float | None:
    """`aggregate` (the median unless named) of one quantity's repetitions, failed runs (NaN) left out; None if
    every run failed."""
    values = [v for v in values if v == v]
    return aggregate(values) if values else None


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
            + ["| " + " | ".join(cells) + " |" for cells in body])


def markdown_appendix(notes: list[str], values: dict[str, dict[str, list[float]]], keys: tuple[str, str],
                      environment: dict[str, str]) -> list[str]:
    """A report's last sections: its notes, every repetition's values (by the two `keys` of `values`), the machine."""
    lines = (["", "Notes:", ""] + [f"- {n}" for n in notes]) if notes else []
    lines += ["", "## Every repetition", "", f"| {keys[0]} | {keys[1]} | values |", "| --- | --- | --- |"]
    for outer, by_inner in values.items():
        for inner, runs in by_inner.items():
            lines.append(f"| {outer} | {inner} | {', '.join(f'{v:.3f}' for v in runs)} |")
    return lines + ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in environment.items()]


def publish(text: str, markdown: Callable[[datetime.datetime, str], str], output: Path, argv: list[str] | None) -> None:
    """The table to stdout; `markdown(now, the command that ran)` to `output`."""
    print(text)
    command = " ".join(["python -m bench.hf"] + (sys.argv[1:] if argv is None else list(argv)))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(datetime.datetime.now(datetime.timezone.utc), command.strip()))
    log(f"wrote {output}")


@dataclass
class Results:
    model_bytes: int
    files: int
    reps: int
    mirrors: list[str]
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    verified: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    probes: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    def add(self, metric: str, mirror: str, value: float) -> None:
        self.values[metric][mirror].append(value)

    def get(self, metric: str, mirror: str, aggregate: Callable[[list[float]], float]) -> float | None:
        return aggregate_runs(self.values.get(metric, {}).get(mirror, []), aggregate)


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    fmt: str
    aggregate: Callable[[list[float]], float] = statistics.median
    ratios: bool = False
    target: str = ""
    check: Callable[[float, float | None], bool | None] | None = None  # (pullthrough, olah) -> met? (None: n/a)


ROWS = [
    Row("warm_s", "warm snapshot (s)", "{:.2f}", ratios=True),
    Row("warm_mibs", "warm throughput (MiB/s)", "{:.1f}", ratios=True, target="≥ 2× Olah",
        check=lambda pt, olah: None if olah is None else pt >= 2 * olah),
    Row("cold_s", "cold snapshot (s)", "{:.2f}", ratios=True),
    Row("cold_mibs", "cold throughput (MiB/s)", "{:.1f}", ratios=True),
    Row("warm_downloads", "upstream file downloads, warm snapshot (max)", "{:.0f}", max, target="0",
        check=lambda pt, olah: pt == 0),
    Row("warm_requests", "upstream requests, warm snapshot (max)", "{:.0f}", max),
    Row("cold_downloads", "upstream file downloads, cold snapshot (max)", "{:.0f}", max),
    Row("cold_bytes", "upstream bytes, cold snapshot (× model, max)", "{:.2f}", max, target="1.00×",
        check=lambda pt, olah: pt <= 1.005),
    Row("cold_requests", "upstream requests, cold snapshot (max)", "{:.0f}", max),
    Row("peak_rss_mib", "peak RSS, VmHWM (MiB)", "{:.0f}", max),
]


def table(results: Results) -> tuple[list[str], list[list[str]]]:
    columns = [m for m in MIRRORS if m in results.mirrors]
    header = ["metric"] + [LABELS[m] for m in columns] + ["pullthrough ÷ Olah", "pullthrough ÷ direct", "target", "met"]
    body = []
    for row in ROWS:
        values = {m: results.get(row.metric, m, row.aggregate) for m in columns}
        if all(v is None for v in values.values()):
            continue
        cells = [row.label] + ["—" if values[m] is None else row.fmt.format(values[m]) for m in columns]
        pt = values.get("pullthrough")
        for ref in ("olah", "direct"):
            other = values.get(ref)
            cells.append(f"{pt / other:.2f}×" if row.ratios and pt is not None and other else "—")
        cells.append(row.target or "—")
        met = None if row.check is None or pt is None else row.check(pt, values.get("olah"))
        cells.append("—" if met is None else "yes" if met else "**no**")
        body.append(cells)
    verified = ["snapshots with every file's sha256 right"]
    for m in columns:
        flags = results.verified.get(m, [])
        verified.append(f"{sum(flags)}/{len(flags)}")
    pt_flags = results.verified.get("pullthrough", [])
    verified += ["—", "—", "all", ("yes" if pt_flags and all(pt_flags) else "**no**") if pt_flags else "—"]
    body.append(verified)
    return header, body


def render_text(results: Results) -> str:
    notes = [f"probe {LABELS[m]}: {text}" for m, text in results.probes.items()] + [f"note: {n}" for n in results.notes]
    return text_table(*table(results), notes)


def render_markdown(results: Results, when: datetime.datetime, command: str) -> str:
    header, body = table(results)
    size = results.model_bytes / 2**20
    lines = [
        "# pullthrough Hugging Face benchmark",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC, `{command}`: `snapshot_download` of a {size:.0f} MiB model ({results.files} "
        f"files, {results.model_bytes} bytes: 2 safetensors shards in LFS behind a separate CDN host, the rest "
        f"plain git files) from the fake Hub in tests/servers/fake_hub.py; medians of {results.reps} "
        f"repetition(s) unless marked max; every server measured in the same run. Ran {results.elapsed:.0f} s.",
        "",
    ]
    lines += markdown_table(header, body)
    lines += [
        "",
        "- *snapshot*: `huggingface_hub.snapshot_download` in a fresh Python process with an empty `HF_HOME`, "
        "`HF_ENDPOINT` at the server, `HF_HUB_DISABLE_TELEMETRY=1`, hf_xet installed and enabled (the repo is not "
        "Xet-backed, so it is not used); the time is the call alone (interpreter start and import excluded); "
        "throughput = model bytes ÷ that time.",
        "- *cold*: the mirror's cache is wiped and the mirror restarted before the snapshot; *warm*: the next "
        "snapshot, into another empty `HF_HOME`, with the mirror's cache populated. The fake Hub has no cache, so "
        "*direct* is one snapshot per repetition, shown in both rows.",
        "- *ratios*: of the row's own quantity (time: lower is better; throughput: higher is better).",
        "- *upstream*: requests the fake Hub and its CDN recorded during the snapshot, counted once they have been "
        "quiet for a second; *file downloads* are GETs answered 200/206 with file bytes (resolve, resolve-cache, "
        "CDN); *bytes* are those bodies' lengths ÷ the model's size.",
        "- *peak RSS*: VmHWM of the server's process group, the maximum over every instance started.",
    ]
    if results.probes:
        lines += ["", "How each server answers a client's request for an LFS file (`/{repo}/resolve/main/"
                      "model-00001-of-00002.safetensors`, redirects not followed, after the run):", ""]
        lines += [f"- {LABELS[m]}: {text}" for m, text in results.probes.items()]
    lines += markdown_appendix(results.notes, results.values, ("metric", "server"), results.environment)
    return "\n".join(lines) + "\n"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def environment() -> dict[str, str]:
    from bench.report import environment as base
    env = {k: v for k, v in base().items() if k in ("cpus", "memory", "kernel", "python", "pullthrough commit")}
    for package in ("huggingface_hub", "hf_xet", "olah", "httpx", "uvicorn"):
        env[package] = _package_version(package)
    return env


# -- the run ----------------------------------------------------------------------------------------


def measure_mirror(mirror: Mirror, hub: FakeHub, files: dict[str, bytes], expected: dict[str, str],
                   results: Results, model_bytes: int, workdir: Path, rep: int, timeout: float) -> None:
    phases = ["direct"] if mirror.name == "direct" else ["cold", "warm"]
    if mirror.name != "direct":
        mirror.fresh()
    for phase in phases:
        shot = run_snapshot(mirror, hub, files, expected, workdir / "homes" / f"{mirror.name}-{phase}-{rep}", timeout)
        results.verified[mirror.name].append(shot.verified)
        if not shot.verified:
            results.notes.append(f"{LABELS[mirror.name]} {phase} snapshot, repetition {rep + 1}: {shot.problem}")
        mibs = model_bytes / 2**20 / shot.seconds if shot.verified else float("nan")
        seconds = shot.seconds if shot.verified else float("nan")
        for slot in (["warm", "cold"] if phase == "direct" else [phase]):
            results.add(f"{slot}_s", mirror.name, seconds)
            results.add(f"{slot}_mibs", mirror.name, mibs)
            results.add(f"{slot}_downloads", mirror.name, shot.upstream_downloads)
            results.add(f"{slot}_requests", mirror.name, shot.upstream_requests)
            if slot == "cold":
                results.add("cold_bytes", mirror.name, shot.upstream_bytes / model_bytes)
        log(f"  {LABELS[mirror.name]} {phase}: {seconds:.2f} s ({mibs:.1f} MiB/s, process {shot.process_seconds:.2f} s), "
            f"upstream {shot.upstream_requests} requests / {shot.upstream_downloads} file downloads / "
            f"{shot.upstream_bytes / 2**20:.1f} MiB, CDN GETs {shot.cdn_gets}, "
            f"{'verified' if shot.verified else 'FAILED: ' + shot.problem}")
    mirror.record_rss()


def main(argv: list[str] | None = None) -> int:
    if "--xet" in (sys.argv[1:] if argv is None else argv):  # the Xet benchmark has its own run
        from bench.hfxet import main as xet_main
        return xet_main(argv)
    args = parse_args(argv)
    started = time.monotonic()
    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    files = build_model(args.shard_mib, tokenizer_kib=256 if args.quick else 2048)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    model_bytes = sum(len(d) for d in files.values())
    results = Results(model_bytes, len(files), args.reps, args.mirrors, environment=environment())
    log(f"model: {len(files)} files, {model_bytes / 2**20:.1f} MiB; mirrors: {', '.join(args.mirrors)}; "
        f"{args.reps} repetition(s)")
    hub = start_hub(workdir / "hub", files, results.notes)
    mirrors: list[Mirror] = []
    try:
        for name in args.mirrors:
            if name == "direct":
                mirrors.append(Direct(workdir, hub))
            elif name == "pullthrough":
                mirrors.append(PullthroughMirror(workdir, hub))
            else:
                mirrors.append(OlahMirror(workdir, hub, args.olah_lfs_netloc))
        for rep in range(args.reps):
            order = mirrors[rep % len(mirrors):] + mirrors[:rep % len(mirrors)]
            log(f"repetition {rep + 1}/{args.reps}: {', '.join(m.name for m in order)}")
            for mirror in order:
                measure_mirror(mirror, hub, files, expected, results, model_bytes, workdir, rep, args.timeout)
        lfs_name = "model-00001-of-00002.safetensors"
        for mirror in mirrors:
            if mirror.name != "direct":
                results.probes[mirror.name] = probe(mirror, files, lfs_name)
        for mirror in mirrors:
            mirror.stop()
            if mirror.peak_rss:
                results.add("peak_rss_mib", mirror.name, mirror.peak_rss / 2**20)
    finally:
        for mirror in mirrors:
            try:
                mirror.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {mirror.name}: {exc!r}")
        hub.stop()
        stop_all_processes()
    results.elapsed = time.monotonic() - started
    publish(render_text(results), partial(render_markdown, results), args.output, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
