"""The Hugging Face Xet benchmark (issue 13): `snapshot_download` of a Xet-backed model with the real hf_xet,
straight from the fake Hub + fake CAS and through pullthrough (`[hf] xet = "native"`), cold and warm, and the
origin's xorb bytes for a revised model through a mirror that holds the first revision. The table goes to
stdout and bench/results/hf-xet-latest.md.

    python -m bench.hf --xet            # a ~80 MiB model (one 80 MiB safetensors file + json files), 3 repetitions
    python -m bench.hf --xet --quick    # a 4 MiB safetensors file, 1 repetition: a smoke run
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
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from bench.hf import (BENCH_DIR, HUB_LFS_THRESHOLD, BenchHub, Mirror, PullthroughMirror, _BenchHandler, aggregate_runs,
                      environment, log, markdown_appendix, markdown_table, publish, safetensors_shard)
from bench.hfclient import client_env, empty_home, run_client, wait_quiet
from bench.report import text_table
from tests.servers import fake_cas as fake_cas_module
from tests.servers.fake_cas import FAST_FAILING_XET, FakeCas
from tests.servers.fake_hub import FakeHub
from tests.servers.ports import stop_all_processes

REPO_ID = "bench-org/bench-xet-model"
BIG_FILE = "model.safetensors"
SEED = 13
#: Plain HTTP refuses anything larger, so a client that silently fell back from Xet fails the snapshot
#: instead of being timed (the json files stay below it).
MAX_HTTP_DOWNLOAD = 1024 * 1024
#: The share of the big file the revised branch rewrites (a fine-tuned layer in the middle).
REVISED_SHARE = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hf --xet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--xet", action="store_true", help="(the switch that selects this benchmark)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 4 MiB safetensors file, 1 repetition")
    parser.add_argument("--model-mib", type=int, help="size of the safetensors file (default 80)")
    parser.add_argument("--reps", type=int, help="repetitions of every measurement (default 3); medians are reported")
    parser.add_argument("--origin-mibs", type=float,
                        help="pace the fake CAS's xorb bodies to this many MiB/s in all (an origin across a network); "
                             "default: as fast as loopback")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one snapshot_download may take")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / ".work" / "hf-xet",
                        help="run state: caches, client homes, logs (wiped at the start of a run)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "hf-xet-latest.md")
    args = parser.parse_args(argv)
    args.model_mib = args.model_mib or (4 if args.quick else 80)
    args.reps = args.reps or (1 if args.quick else 3)
    return args


# -- the model --------------------------------------------------------------------------------------


def build_models(model_mib: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Seeded, byte-identical every run: `main` and `revised`, where ~10 % of the big file's tensor bytes in
    the middle are rewritten (same length, same header) and the json files are unchanged."""
    rng = random.Random(SEED)
    big = safetensors_shard(rng, model_mib * 2**20, "layers.0.weight")
    cut, span = len(big) // 2, int(len(big) * REVISED_SHARE)
    revised_big = big[:cut] + rng.randbytes(span) + big[cut + span:]
    vocab = {f"tok{n}": n for n in range(8000)}  # about 120 KiB of json, under MAX_HTTP_DOWNLOAD
    small = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlicense: apache-2.0\n---\n# bench-xet-model\n\nSeeded random weights, stored in Xet.\n",
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                   "hidden_size": 512, "vocab_size": len(vocab)}, indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}).encode(),
    }
    return {**small, BIG_FILE: big}, {**small, BIG_FILE: revised_big}


class Link:
    """One shared pipe of `rate` bytes per second: every paced connection waits its turn, so the total is the rate
    however many connections hf_xet or the mirror opens (as a network link between them and the origin)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def pace(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + size / self.rate
            wait = self._free_at - now
        time.sleep(wait)


class _PacedWriter:
    """A handler's `wfile` whose writes go out in 64 KiB pieces through a `Link`."""

    def __init__(self, raw, link: Link) -> None:
        self._raw, self._link = raw, link

    def write(self, data) -> int:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 16):
            piece = view[start:start + (1 << 16)]
            self._link.pace(len(piece))
            self._raw.write(piece)
        return len(view)

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


class _PacedHandler(fake_cas_module._Handler):
    link: Link

    def setup(self) -> None:
        super().setup()
        self.wfile = _PacedWriter(self.wfile, self.link)


def pace_transfers(cas: FakeCas, mibs: float) -> None:
    """The CAS's transfer host (xorb bodies) sends `mibs` MiB/s in all; what it answers is unchanged."""
    handler = type("PacedHandler", (_PacedHandler,), {"link": Link(mibs * 2**20)})
    for server in cas._servers:  # socketserver looks the class up for every connection
        if server.role == "transfer":
            server.RequestHandlerClass = handler


def start_servers(workdir: Path, main: dict[str, bytes], revised: dict[str, bytes]) -> tuple[FakeHub, FakeCas]:
    """The fake CAS, and the fake Hub wired to it: the real hf_xet uploads both revisions (the second one
    dedups against the first, as a real push of a fine-tuned model does)."""
    cas = FakeCas.start(workdir / "cas")
    hub = BenchHub.start(workdir / "hub", lfs_threshold=HUB_LFS_THRESHOLD, cas=cas)
    hub.use_handler(_BenchHandler)  # TCP_NODELAY, as in bench/hf.py
    hub.add_repo(REPO_ID, xet=True, files=main, branches={"revised": revised})
    return hub, cas


# -- one snapshot -----------------------------------------------------------------------------------

@dataclass
class Snapshot:
    seconds: float
    verified: bool
    problem: str
    hub_requests: int
    cas_requests: int
    reconstructions: int
    xorb_gets: int
    xorb_bytes: int


def run_snapshot(endpoint: str, hub: FakeHub, cas: FakeCas, revision: str, expected: dict[str, str], home: Path,
                 timeout: float) -> Snapshot:
    with empty_home(home):
        hub.reset_hits()
        cas.reset_requests()
        run = run_client(client_env(endpoint, home) | FAST_FAILING_XET, timeout, REPO_ID, revision,
                         str(MAX_HTTP_DOWNLOAD))
        wait_quiet(lambda: len(hub.hits()) + len(cas.requests()), quiet=0.7)
        verified, problem = run.check(expected)
    return Snapshot(run.seconds if verified else float("nan"), verified, problem, len(hub.hits()),
                    len(cas.requests(host="cas")), cas.count(kind=("reconstruction", "batch-reconstruction")),
                    cas.count(kind="xorb-range", method="GET"), cas.xorb_bytes_served())


# -- results ----------------------------------------------------------------------------------------

#: (key, label, revision, through the mirror?) in the order of the table.
PHASES = [
    ("direct", "direct: fake Hub + CAS, fresh client cache", "main", False),
    ("cold", "pullthrough cold (fresh mirror and client caches)", "main", True),
    ("warm", "pullthrough warm (mirror cache kept, fresh client cache)", "main", True),
    ("direct_revised", "direct, revised branch", "revised", False),
    ("revised", "pullthrough, revised branch (mirror holds main)", "revised", True),
]


@dataclass
class Results:
    model_bytes: int
    big_bytes: int
    changed_bytes: int
    reps: int
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    verified: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    peak_rss: int = 0
    elapsed: float = 0.0

    def add(self, phase: str, shot: Snapshot) -> None:
        self.verified[phase].append(shot.verified)
        for name in ("seconds", "hub_requests", "cas_requests", "reconstructions", "xorb_gets", "xorb_bytes"):
            self.values[phase][name].append(float(getattr(shot, name)))

    def get(self, phase: str, name: str, aggregate: Callable[[list[float]], float] = statistics.median) -> float | None:
        return aggregate_runs(self.values.get(phase, {}).get(name, []), aggregate)

    def speedup(self, phase: str) -> float | None:
        """direct's median time ÷ this phase's: above 1 is faster than the client going to the origin itself."""
        direct, mine = self.get("direct", "seconds"), self.get(phase, "seconds")
        return direct / mine if direct and mine else None

    def revised_fraction(self) -> float | None:
        served = self.get("revised", "xorb_bytes", max)
        return None if served is None else served / self.big_bytes


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def phase_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["snapshot", "time (s)", "MiB/s", "speed vs direct", "origin xorb MiB (max)", "× big file",
              "origin xorb GETs (max)", "CAS API requests (max)", "Hub requests (max)", "verified"]
    body = []
    for key, label, _, _ in PHASES:
        seconds = results.get(key, "seconds")
        xorb = results.get(key, "xorb_bytes", max)
        flags = results.verified.get(key, [])
        body.append([label, _fmt(seconds, "{:.2f}"),
                     _fmt(results.model_bytes / 2**20 / seconds if seconds else None, "{:.1f}"),
                     _fmt(results.speedup(key), "{:.2f}×"),
                     _fmt(None if xorb is None else xorb / 2**20, "{:.1f}"),
                     _fmt(None if xorb is None else xorb / results.big_bytes, "{:.2f}×"),
                     _fmt(results.get(key, "xorb_gets", max), "{:.0f}"),
                     _fmt(results.get(key, "cas_requests", max), "{:.0f}"),
                     _fmt(results.get(key, "hub_requests", max), "{:.0f}"),
                     f"{sum(flags)}/{len(flags)}"])
    return header, body


def target_table(results: Results) -> tuple[list[str], list[list[str]]]:
    warm, fraction = results.speedup("warm"), results.revised_fraction()
    all_ok = all(all(flags) for flags in results.verified.values()) and bool(results.verified)
    warm_origin = results.get("warm", "xorb_bytes", max)
    rows = [
        ["warm snapshot through pullthrough vs direct (direct time ÷ warm time)", _fmt(warm, "{:.2f}×"), "≥ 2×",
         "—" if warm is None else "yes" if warm >= 2 else "**no**"],
        [f"origin xorb bytes for the revised model ÷ its big file ({results.changed_bytes / results.big_bytes:.0%} "
         "of it changed)", _fmt(fraction, "{:.3f}×"), "≤ 0.25×",
         "—" if fraction is None else "yes" if fraction <= 0.25 else "**no**"],
        ["origin xorb bytes, warm snapshot", _fmt(warm_origin, "{:.0f}"), "0",
         "—" if warm_origin is None else "yes" if warm_origin == 0 else "**no**"],
        ["every snapshot's files right (sha256)", "yes" if all_ok else "no", "all", "yes" if all_ok else "**no**"],
    ]
    return ["target", "measured", "target", "met"], rows


DIRECT_CAVEAT = ("*direct* is the client against the Python fake Hub and fake CAS of tests/servers/ on the same "
                 "machine, not the real Hub: the fake serves xorbs from memory over loopback and shares the cores "
                 "with pullthrough and the client, so the ratio flatters neither side much; a warm snapshot is then "
                 "bounded by the client itself (hf_xet reassembling and writing the file), and the ≥ 2× target "
                 "presumes an origin slower than loopback, as the real CAS across a network is.")


def render_text(results: Results) -> str:
    notes = [f"note: {DIRECT_CAVEAT}"] + [f"note: {n}" for n in results.notes]
    if results.peak_rss:
        notes.append(f"pullthrough peak RSS (VmHWM): {results.peak_rss / 2**20:.0f} MiB")
    return text_table(*phase_table(results), []) + "\n\n" + text_table(*target_table(results), notes)


def render_markdown(results: Results, when: datetime.datetime, command: str) -> str:
    lines = [
        "# pullthrough Hugging Face Xet benchmark",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC, `{command}`: `snapshot_download` with hf_xet of a "
        f"{results.model_bytes / 2**20:.0f} MiB Xet-backed model ({results.model_bytes} bytes: `{BIG_FILE}` of "
        f"{results.big_bytes} bytes in Xet, stored by the real hf_xet in the fake CAS, and 5 json/text files in "
        f"git); medians of {results.reps} repetition(s) unless marked max. Ran {results.elapsed:.0f} s.",
        "",
    ]
    lines += markdown_table(*phase_table(results)) + [""] + markdown_table(*target_table(results))
    lines += [
        "",
        f"- {DIRECT_CAVEAT}",
        "- *snapshot*: `huggingface_hub.snapshot_download` in a fresh Python process with an empty `HF_HOME` "
        "(so an empty hf_xet chunk cache), `HF_ENDPOINT` at the fake Hub (direct) or at pullthrough, "
        f"`MAX_HTTP_DOWNLOAD_SIZE` lowered to {MAX_HTTP_DOWNLOAD} so only hf_xet can fetch the big file; the time "
        "is the call alone (interpreter start and import excluded); MiB/s = model bytes ÷ that time.",
        "- *cold*: pullthrough stopped, its cache wiped, started again; *warm*: the next snapshot of `main`; "
        "*revised*: then a snapshot of the `revised` branch, whose big file has "
        f"{results.changed_bytes} bytes ({REVISED_SHARE:.0%}) rewritten in the middle.",
        "- *origin xorb MiB*: body bytes the fake CAS's transfer host sent during the snapshot (counted once the "
        "Hub and CAS logs have been quiet, so background fetches count), also ÷ the big file's size; *CAS API "
        "requests*: token-authorised requests to the CAS (reconstructions and the like).",
    ]
    if results.peak_rss:
        lines.append(f"- pullthrough's peak RSS (VmHWM, over every start): {results.peak_rss / 2**20:.0f} MiB.")
    lines += markdown_appendix(results.notes, results.values, ("snapshot", "quantity"), results.environment)
    return "\n".join(lines) + "\n"


# -- the run ----------------------------------------------------------------------------------------


def measure(mirror: Mirror, hub: FakeHub, cas: FakeCas, expected: dict[str, dict[str, str]], results: Results,
            workdir: Path, rep: int, timeout: float) -> None:
    """One repetition: direct first in even repetitions, the mirror first in odd ones (the machine warms up)."""
    direct = [p for p in PHASES if not p[3]]
    mirrored = [p for p in PHASES if p[3]]
    for group in ((direct, mirrored) if rep % 2 == 0 else (mirrored, direct)):
        if group is mirrored:
            mirror.fresh()
        for key, label, revision, through in group:
            shot = run_snapshot(mirror.url if through else hub.url, hub, cas, revision, expected[revision],
                                workdir / "homes" / f"{key}-{rep}", timeout)
            results.add(key, shot)
            if not shot.verified:
                results.notes.append(f"{key} snapshot, repetition {rep + 1}: {shot.problem}")
            log(f"  {key}: {shot.seconds:.2f} s, origin xorb {shot.xorb_bytes / 2**20:.2f} MiB in {shot.xorb_gets} "
                f"GETs, CAS API {shot.cas_requests}, Hub {shot.hub_requests}, "
                f"{'verified' if shot.verified else 'FAILED: ' + shot.problem}")
    mirror.record_rss()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    main_files, revised_files = build_models(args.model_mib)
    expected = {rev: {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
                for rev, files in (("main", main_files), ("revised", revised_files))}
    big = len(main_files[BIG_FILE])
    changed = int(big * REVISED_SHARE)  # the span build_models rewrote (a random byte equals the old one 1 in 256)
    results = Results(sum(len(d) for d in main_files.values()), big, changed, args.reps, environment=environment())
    results.environment["load average at start (1, 5, 15 min)"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    log(f"model: {len(main_files)} files, {results.model_bytes / 2**20:.1f} MiB; revised: {changed} bytes of "
        f"{BIG_FILE} rewritten; {args.reps} repetition(s); uploading both revisions with hf_xet")
    hub, cas = start_servers(workdir / "origin", main_files, revised_files)
    if args.origin_mibs:
        pace_transfers(cas, args.origin_mibs)  # after the uploads: they go to the CAS API, not the transfer host
        results.notes.append(f"the fake CAS's transfer host sent xorb bodies at {args.origin_mibs:g} MiB/s in all "
                             "(`--origin-mibs`: a shared link, every connection waiting its turn), standing in "
                             "for an origin across a network; the Hub's json files were not paced.")
    mirror = PullthroughMirror(workdir, hub, hf_settings={"xet": "native"})
    try:
        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            measure(mirror, hub, cas, expected, results, workdir, rep, args.timeout)
        mirror.stop()
        results.peak_rss = mirror.peak_rss
    finally:
        try:
            mirror.stop()
        except Exception as exc:  # still stop the fakes
            log(f"stopping pullthrough: {exc!r}")
        hub.stop()
        cas.stop()
        stop_all_processes()
    results.elapsed = time.monotonic() - started
    publish(render_text(results), partial(render_markdown, results), args.output, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(["--xet"] + sys.argv[1:]))
