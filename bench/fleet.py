"""The fleet benchmark (issue 6): 12 concurrent cold GETs of one blob spread over 3 cache nodes.
Three pullthrough nodes that share one cache dir and one PostgreSQL index against three independent
distribution proxies, both in front of the same upstream; the table goes to stdout and
bench/results/fleet.md.

    python -m bench.fleet            # 1 GiB layer, 3 repetitions (medians)
    python -m bench.fleet --quick    # 256 MiB, 1 repetition: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # `python bench/fleet.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.image import REPOSITORY, BenchImage, build_layout  # noqa: E402
from bench.measure import timed_get  # noqa: E402
from bench.proxies import DistributionProxy  # noqa: E402
from bench.report import environment as base_environment, text_table  # noqa: E402
# _exit_on_signal turns SIGTERM/SIGHUP into SystemExit, so `finally` stops every server and drops the database.
from bench.run import _exit_on_signal, settle_upstream, start_upstream, upstream_blob_gets  # noqa: E402
from tests.servers.ports import free_port, stop_all_processes  # noqa: E402
from tests.servers.pullthrough import Pullthrough, pullthrough_command, render_config  # noqa: E402
from tests.servers.registry import Distribution  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SEED = 1
# "single": one pullthrough node (same PostgreSQL set-up) with the same clients per node, the
# reference issue 12 compares the fleet's cold GET with. "single-all": one node with all the fleet's
# clients: on one machine the fleet's clients and servers share its cores, so this is the reference
# that does the same work, and the ratio to it is what spreading the clients over nodes costs.
SYSTEMS = ("pullthrough", "single", "single-all", "distribution")
POSTGRES_ADMIN_URL = os.environ.get("PULLTHROUGH_TEST_POSTGRES",
                                    "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres")


def log(message: str) -> None:
    print(f"[bench.fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 repetition")
    parser.add_argument("--size-mib", type=int, help="size of the layer's payload in MiB (default 1024)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3); medians are reported")
    parser.add_argument("--nodes", type=int, default=3, help="cache nodes per system")
    parser.add_argument("--clients-per-node", type=int, default=4, help="concurrent clients on each node")
    parser.add_argument("--fill-lease", default="5s", help="pullthrough's fill_lease setting")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated systems to measure (pullthrough, single, single-all, distribution)")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL,
                        help="SQLAlchemy URL of a PostgreSQL database with the right to create databases "
                             "(default: $PULLTHROUGH_TEST_POSTGRES or the tests' default)")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / ".work",
                        help="where built images, upstream storage and run state are kept (shared with bench.run)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "fleet.md")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one client's GET may take")
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    args.reps = args.reps or (1 if args.quick else 3)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.nodes < 1 or args.clients_per_node < 1:
        parser.error("--nodes and --clients-per-node must be at least 1")
    return args


# -- PostgreSQL ---------------------------------------------------------------------------------------


def create_database(admin_url: str) -> str:
    """A new, empty database next to `admin_url`'s; returns its URL."""
    from sqlalchemy import create_engine, text

    name = f"pt_fleet_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            # FORCE: a node killed mid-request may leave a backend behind for a moment.
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    finally:
        admin.dispose()


def postgres_version(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    except Exception as exc:  # the environment table must not stop the run; the run itself will say why
        return f"unreachable ({type(exc).__name__})"
    finally:
        engine.dispose()


# -- the clients --------------------------------------------------------------------------------------

_CURL_FORMAT = "%{stderr}\n@@ %{time_total} %{size_download} %{http_code} %{time_starttransfer}\n"
_CURL_RESULT = re.compile(r"^@@ ([\d.]+) (\d+) (\d{3}) ([\d.]+)$", re.M)


def hasher_argv() -> list[str]:
    """sha256 of stdin, hex first: openssl where it is installed (about 2.5x coreutils here),
    so that 12 clients hashing as they read take as little of the 2 cores from the servers as can be."""
    if shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256", "-r"]
    return ["sha256sum"]


@dataclass(frozen=True)
class ClientResult:
    """One client's GET: which node, curl's view of it, and the sha256 of the body it received."""

    node: int
    seconds: float
    first_byte: float
    size: int
    status: int
    curl_exit: int
    sha256: str
    error: str = ""

    def ok(self, digest: str) -> bool:
        return self.status == 200 and f"sha256:{self.sha256}" == digest


@dataclass
class _Client:
    node: int
    curl: subprocess.Popen
    hasher: subprocess.Popen


def fleet_gets(urls: list[str], clients_per_node: int, timeout: float) -> tuple[float, list[ClientResult]]:
    """`clients_per_node` GETs on every URL, all started at once (interleaved over the nodes, so no
    node gets all its clients first); each body is hashed as it arrives, as containerd does. Returns
    the wall time until the last client finished, and every client's result."""
    hasher = hasher_argv()
    clients: list[_Client] = []
    started = time.monotonic()
    for index in range(clients_per_node * len(urls)):
        node = index % len(urls)
        curl = subprocess.Popen(["curl", "-sS", "-w", _CURL_FORMAT, "--max-time", str(int(timeout)), urls[node]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        sha = subprocess.Popen(hasher, stdin=curl.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        curl.stdout.close()  # the hasher holds the pipe now: curl sees EPIPE if it dies
        clients.append(_Client(node, curl, sha))
    outputs = []
    for client in clients:
        digest_line = client.hasher.communicate()[0].decode()
        curl_err = client.curl.communicate()[1].decode(errors="replace")
        outputs.append((client, digest_line, curl_err))
    wall = time.monotonic() - started
    return wall, [_client_result(client, digest_line, curl_err) for client, digest_line, curl_err in outputs]


def _client_result(client: _Client, digest_line: str, curl_err: str) -> ClientResult:
    match = None
    for match in _CURL_RESULT.finditer(curl_err):
        pass  # the last one: curl's own error message, if any, comes before it
    error = _CURL_RESULT.sub("", curl_err).strip()
    if match is None:
        return ClientResult(client.node, float("nan"), float("nan"), 0, 0, client.curl.returncode,
                            digest_line.split()[0] if digest_line.split() else "", error or "no curl output")
    seconds, size, status, first_byte = match.groups()
    return ClientResult(client.node, float(seconds), float(first_byte), int(size), int(status),
                        client.curl.returncode, digest_line.split()[0] if digest_line.split() else "", error)


# -- the two fleets -----------------------------------------------------------------------------------


class Fleet:
    """N cache nodes of one system in front of the benchmark upstream."""

    name = ""
    label = ""

    @property
    def urls(self) -> list[str]:
        """One blob URL per node."""
        raise NotImplementedError

    def fresh(self) -> None:
        """Stop every node, wipe every node's storage, start again: the next GET is cold everywhere."""
        raise NotImplementedError

    def stored(self, digest: str) -> bool:
        """True once the system holds `digest` as it will keep it, no fill of it in progress."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def problems_since_fresh(self) -> list[str]:
        """Lines worth a note from the nodes' own logs since the last `fresh()`."""
        return []

    def wait_stored(self, digest: str, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stored(digest):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


class PullthroughFleet(Fleet):
    """N `pullthrough serve` processes with one cache dir and one PostgreSQL database, each with its
    own `node` name; a fresh database (migrated with `pullthrough db upgrade`) per repetition."""

    name = "pullthrough"

    def __init__(self, image: BenchImage, workdir: Path, upstream_url: str, nodes: int, admin_url: str,
                 fill_lease: str, name: str = "pullthrough") -> None:
        self.name = name
        self.image = image
        self.workdir = workdir
        self.cache_dir = workdir / "cache"
        self.admin_url = admin_url
        self.fill_lease = fill_lease
        self.label = f"{nodes} pullthrough nodes" if nodes > 1 else "1 pullthrough node"
        self.registries = [{"name": "bench.local", "url": upstream_url, "default": True, "tag_ttl": "1h"}]
        # Fixed ports: every repetition starts new server objects (new database_url) on the same addresses.
        self.ports = [free_port() for _ in range(nodes)]
        self.servers: list[Pullthrough] = []
        self.database_url: str | None = None
        self._log_offsets: list[int] = [0] * nodes

    def node_workdir(self, index: int) -> Path:
        return self.workdir / f"node{index + 1}"

    def settings(self, index: int) -> dict[str, object]:
        return {"database_url": self.database_url, "node": f"node{index + 1}", "fill_lease": self.fill_lease}

    @property
    def urls(self) -> list[str]:
        return [f"{server.url}/v2/{REPOSITORY}/blobs/{self.image.layer_digest}" for server in self.servers]

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True)
        self.database_url = create_database(self.admin_url)
        self.db_upgrade()
        for index, port in enumerate(self.ports):
            log_path = self.node_workdir(index) / "pullthrough.log"
            self._log_offsets[index] = log_path.stat().st_size if log_path.exists() else 0
            self.servers.append(Pullthrough.start(self.cache_dir, self.registries, workdir=self.node_workdir(index),
                                                  port=port, **self.settings(index)))

    def db_upgrade(self) -> None:
        """`pullthrough db upgrade` with node 1's config, as an operator runs it before starting nodes
        on a new database."""
        config = self.workdir / "db-upgrade.toml"
        top = {"cache_dir": str(self.cache_dir), **self.settings(0)}
        config.write_text(render_config(top, self.registries))
        argv = pullthrough_command()[:-1] + ["db", "upgrade", "--config", str(config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"pullthrough db upgrade failed ({result.returncode}): {message}")

    def stored(self, digest: str) -> bool:
        if not self.servers:
            return False
        # Committed, and no node still filling a temp file (a node filling on its own would
        # still be sending upstream GETs).
        return self.servers[0].blob_path(digest).exists() and not self.servers[0].tmp_files()

    def problems_since_fresh(self) -> list[str]:
        problems = []
        for index, server in enumerate(self.servers):
            if not server.log_path.exists():
                continue
            with open(server.log_path, "rb") as f:
                f.seek(self._log_offsets[index])
                lines = f.read().decode(errors="replace").splitlines()
            bad = [line for line in lines if " ERROR " in line or " WARNING " in line or line.startswith("Traceback")]
            if bad:
                problems.append(f"node{index + 1}: {len(bad)} ERROR/WARNING line(s) in {server.log_path}, "
                                f"first: {bad[0].strip()[:200]}")
        return problems

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []
        if self.database_url is not None:
            drop_database(self.admin_url, self.database_url)
            self.database_url = None


class DistributionFleet(Fleet):
    """N distribution proxies (bench/proxies.py), each with its own storage: distribution has no way
    to share one cache between instances other than a shared storage driver, which proxy mode does
    not coordinate either."""

    name = "distribution"

    def __init__(self, image: BenchImage, workdir: Path, upstream_url: str, nodes: int) -> None:
        self.label = f"{nodes} distribution proxies"
        self.proxies = [DistributionProxy(image, workdir / f"proxy{index + 1}", upstream_url)
                        for index in range(nodes)]

    @property
    def urls(self) -> list[str]:
        return [proxy.blob_url for proxy in self.proxies]

    def fresh(self) -> None:
        for proxy in self.proxies:
            proxy.fresh("fleet cold GETs")

    def stored(self, digest: str) -> bool:
        return all(proxy.committed_path(digest).exists() for proxy in self.proxies)

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Results:
    size: int
    reps: int
    nodes: int
    clients_per_node: int
    systems: list[str]
    labels: dict[str, str]
    environment: dict[str, str]
    # What the pullthrough nodes were configured with beyond the shared cache_dir and database_url.
    pullthrough_keys: str = ""
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # (system, repetition) -> every client's result, for the markdown's detail.
    clients: dict[tuple[str, int], list[ClientResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def client_count(self) -> int:
        return self.nodes * self.clients_per_node

    def add(self, metric: str, system: str, value: float) -> None:
        self.values[metric][system].append(value)

    def get(self, metric: str, system: str, aggregate: Callable[[list[float]], float]) -> float | None:
        values = [v for v in self.values.get(metric, {}).get(system, []) if v == v]  # NaN: a failed run
        return aggregate(values) if values else None


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    fmt: str
    aggregate: Callable[[list[float]], float] = statistics.median
    ratio: bool = True
    single_ratio: bool = False  # also pullthrough's fleet ÷ one pullthrough node (and `check` gets that node's value)
    expected: str = ""
    # (pullthrough, distribution or the single node) -> does the run match the issues' expectation? None: cannot tell
    check: Callable[[float | None, float | None], bool | None] | None = None


def rows(results: Results) -> list[Row]:
    n, total = results.nodes, results.client_count
    return [
        Row("wall_s", f"cold GETs, {results.clients_per_node} per node, wall until the last ends (s)", "{:.2f}",
            single_ratio=True, expected="fleet ≤ 1.3× one node",
            check=lambda pt, single: None if pt is None or single is None else pt <= 1.3 * single),
        Row("delivered_mibs", "delivered to all clients (MiB/s)", "{:.0f}"),
        Row("slowest_client_s", "slowest client (s)", "{:.2f}"),
        Row("fastest_client_s", "fastest client (s)", "{:.2f}"),
        Row("upstream_gets", "upstream GETs of the blob", "{:.0f}",
            expected=f"pullthrough 1; distribution ≥ {n}",
            check=lambda pt, d: None if pt is None else pt == 1 and (d is None or d >= n)),
        Row("upstream_bytes", "upstream bytes (× blob)", "{:.2f}",
            expected=f"pullthrough 1.00×; distribution ≥ {n}×",
            check=lambda pt, d: None if pt is None else pt <= 1.01 and (d is None or d >= n - 0.01)),
        Row("bad_bodies", f"bodies whose sha256 ≠ digest (total of {total} × {results.reps})", "{:.0f}", sum,
            ratio=False, expected="0", check=lambda pt, d: None if pt is None else pt == 0 and not d),
    ]


def table(results: Results) -> tuple[list[str], list[list[str]]]:
    columns = [s for s in SYSTEMS if s in results.systems]
    header = (["metric"] + [results.labels[s] for s in columns]
              + ["pullthrough ÷ distribution", "pullthrough ÷ 1 node", "÷ 1 node, all clients", "expected", "met"])
    body = []
    for row in rows(results):
        values = {s: results.get(row.metric, s, row.aggregate) for s in columns}
        if all(v is None for v in values.values()):
            continue
        cells = [row.label] + ["—" if values[s] is None else row.fmt.format(values[s]) for s in columns]
        pt, dist, single = values.get("pullthrough"), values.get("distribution"), values.get("single")
        cells.append(f"{pt / dist:.2f}×" if row.ratio and pt is not None and dist else "—")
        cells.append(f"{pt / single:.2f}×" if row.single_ratio and pt is not None and single else "—")
        alone = values.get("single-all")
        cells.append(f"{pt / alone:.2f}×" if row.single_ratio and pt is not None and alone else "—")
        cells.append(row.expected or "—")
        met = None if row.check is None else row.check(pt, single if row.single_ratio else dist)
        cells.append("—" if met is None else "yes" if met else "**no**")
        body.append(cells)
    return header, body


def render_text(results: Results) -> str:
    return text_table(*table(results), [f"note: {n}" for n in results.notes])


def _size_label(size: int) -> str:
    return f"{size / 2**30:.0f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def render_markdown(results: Results, when: datetime.datetime, command: str) -> str:
    header, body = table(results)
    n, per, total = results.nodes, results.clients_per_node, results.client_count
    lines = [
        "# pullthrough fleet benchmark",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC, `{command}`: {total} concurrent cold GETs of one {_size_label(results.size)} "
        f"blob ({results.size} bytes) spread over {n} cache nodes ({per} clients each), every node in front of "
        f"the same local docker-registry upstream; medians of {results.reps} repetition(s) unless marked total. "
        f"Ran {results.elapsed:.0f} s.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += [
        "",
        f"- *pullthrough*: {n} `pullthrough serve` processes with one `cache_dir` and one PostgreSQL "
        f"`database_url`, and {results.pullthrough_keys or 'no other setting'}; *distribution*: "
        f"{n} docker-registry processes in proxy mode, each with its own storage.",
        "- *cold*: before every repetition each system's nodes are stopped, their storage wiped (for pullthrough "
        "also a new database, migrated with `pullthrough db upgrade`) and started again.",
        f"- *clients*: {total} curls started together, interleaved over the nodes, each piping the body into a "
        "sha256 as it arrives; *wall* runs from the first start to the last body's end; *delivered* = "
        f"{total} × blob ÷ wall. Times count only the repetitions in which every body's sha256 was right "
        "(the others are `nan` below).",
        f"- *1 node, all clients*: one pullthrough node serving all {total} clients. Every process of the run "
        f"shares one machine's cores, so the fleet does {n} times the work of *1 pullthrough node* (its "
        f"{total} clients' copies and hashes, {n} servers' sends); beside the node that does the same work, the "
        "ratio is what spreading the clients over nodes costs (cross-node following through the shared "
        "index and temp file).",
        "- *upstream*: GETs of the blob in the upstream registry's access log and their bytes, counted once the "
        "system has stored the blob (no fill left in progress) and the log has been quiet for a second, so "
        "background fetches count too.",
    ]
    if results.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results.notes]
    lines += ["", "## Every repetition", "", "| metric | system | values |", "| --- | --- | --- |"]
    for metric, by_system in results.values.items():
        for system, values in by_system.items():
            lines.append(f"| {metric} | {system} | {', '.join(f'{v:.3f}' for v in values)} |")
    lines += ["", "## Every client", "",
              "Seconds per client (curl's `time_total`), by node; a client whose body was wrong is marked with "
              "its status, size and curl exit code.", "",
              "| system | repetition | " + " | ".join(f"node{i + 1}" for i in range(n)) + " |",
              "| --- | ---: |" + " --- |" * n]
    for (system, rep), clients in results.clients.items():
        cells = []
        for node in range(n):
            cells.append(", ".join(_client_cell(c, results.size) for c in clients if c.node == node))
        lines.append(f"| {system} | {rep + 1} | " + " | ".join(cells) + " |")
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in results.environment.items()]
    return "\n".join(lines) + "\n"


def _client_cell(client: ClientResult, size: int) -> str:
    if client.status == 200 and client.size == size and client.curl_exit == 0:
        return f"{client.seconds:.2f}"
    return f"{client.seconds:.2f} (HTTP {client.status}, {client.size} B, curl {client.curl_exit})"


def environment(admin_url: str) -> dict[str, str]:
    env = {k: v for k, v in base_environment().items() if k not in ("nginx", "wrk")}
    # The command the nodes run, which need not be this work tree's (a wrapper earlier in PATH).
    env["pullthrough command"] = " ".join(pullthrough_command()[:-1])
    env["postgresql"] = postgres_version(admin_url)
    env["client hash"] = " ".join(hasher_argv())
    return env


# -- the run ------------------------------------------------------------------------------------------


def measure(fleet: Fleet, upstream: Distribution, image: BenchImage, clients_per_node: int, timeout: float,
            results: Results, rep: int) -> None:
    log(f"{fleet.label}: stopping, wiping, starting")
    fleet.fresh()
    mark = upstream.mark()
    wall, clients = fleet_gets(fleet.urls, clients_per_node, timeout)
    bad = [c for c in clients if not c.ok(image.layer_digest)]
    if not fleet.wait_stored(image.layer_digest):
        results.notes.append(f"{fleet.label}, repetition {rep + 1}: the blob was not stored (or a fill was still "
                             "in progress) 300 s after the clients ended; upstream counted anyway")
    settle_upstream(upstream, mark, image.layer_digest)
    gets, sent = upstream_blob_gets(upstream, mark, image.layer_digest)
    times = [c.seconds for c in clients if c.seconds == c.seconds]
    results.clients[(fleet.name, rep)] = clients
    # Times only count when every client got the blob: a fast failure is not a fast fleet. NaN
    # keeps the repetition in the per-repetition table and out of the medians.
    nan = float("nan")
    results.add("wall_s", fleet.name, nan if bad else wall)
    results.add("delivered_mibs", fleet.name, nan if bad else len(clients) * image.layer_size / 2**20 / wall)
    results.add("slowest_client_s", fleet.name, nan if bad else max(times))
    results.add("fastest_client_s", fleet.name, nan if bad else min(times))
    results.add("upstream_gets", fleet.name, gets)
    results.add("upstream_bytes", fleet.name, sent / image.layer_size)
    results.add("bad_bodies", fleet.name, len(bad))
    for client in bad:
        results.notes.append(
            f"{fleet.label}, repetition {rep + 1}: a client of node{client.node + 1} got HTTP {client.status}, "
            f"{client.size} bytes, sha256:{client.sha256[:16]}…, curl exit {client.curl_exit}"
            + (f" ({client.error[:160]})" if client.error else ""))
    for problem in fleet.problems_since_fresh():
        results.notes.append(f"{fleet.label}, repetition {rep + 1}: {problem}")
    log(f"{fleet.label:<24} wall {wall:7.2f}s, clients {min(times, default=float('nan')):.2f}-"
        f"{max(times, default=float('nan')):.2f}s; upstream: {gets} GET(s), {sent / image.layer_size:.2f}x the blob; "
        f"{len(clients) - len(bad)}/{len(clients)} bodies right")


def make_fleet(name: str, image: BenchImage, run_dir: Path, upstream: Distribution, args: argparse.Namespace) -> Fleet:
    if name == "pullthrough":
        return PullthroughFleet(image, run_dir / "pullthrough", upstream.url, args.nodes, args.postgres,
                                args.fill_lease)
    if name in ("single", "single-all"):
        return PullthroughFleet(image, run_dir / name, upstream.url, 1, args.postgres, args.fill_lease, name=name)
    return DistributionFleet(image, run_dir / "distribution", upstream.url, args.nodes)


def check_tools() -> None:
    missing = [tool for tool in ("docker-registry", "skopeo", "curl") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench.fleet: missing {', '.join(missing)} (Debian: apt-get install docker-registry "
                         "skopeo curl)")


def run(args: argparse.Namespace) -> Results:
    check_tools()
    workdir = args.workdir.resolve()
    run_dir = workdir / "fleet"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    started = time.monotonic()
    log(f"building (or reusing) the {args.size_mib} MiB image under {workdir}")
    image = build_layout(workdir / f"layout-{args.size_mib}m-seed{SEED}", args.size_mib << 20, SEED)
    log(f"image ready: layer {image.layer_digest[:19]}, {image.layer_size} bytes "
        f"({time.monotonic() - started:.1f}s)")
    fleet_labels = {"pullthrough": f"{args.nodes} pullthrough nodes", "single": "1 pullthrough node",
                    "single-all": f"1 node, all {args.nodes * args.clients_per_node} clients",
                    "distribution": f"{args.nodes} distribution proxies"}
    results = Results(size=image.layer_size, reps=args.reps, nodes=args.nodes, clients_per_node=args.clients_per_node,
                      systems=args.systems, labels=fleet_labels, environment=environment(args.postgres))
    results.pullthrough_keys = (f'`node = "node1"` … `"node{args.nodes}"` (one per node) and '
                                f'`fill_lease = "{args.fill_lease}"`')

    fleets: list[Fleet] = []
    upstream = None
    try:
        upstream = start_upstream(workdir, run_dir, image)
        # One direct read first, so that no system's first cold run also pays for a cold page cache upstream.
        timed_get(f"{upstream.url}/v2/{REPOSITORY}/blobs/{image.layer_digest}").check(image.layer_size, "upstream")
        for name in args.systems:
            fleets.append(make_fleet(name, image, run_dir, upstream, args))
            fleets[-1].label = fleet_labels[name]  # the log's words are the table's
        for rep in range(args.reps):
            # Rotate the order each repetition so that no system always goes first on a noisy box.
            order = fleets[rep % len(fleets):] + fleets[:rep % len(fleets)]
            log(f"repetition {rep + 1}/{args.reps}: {', '.join(f.name for f in order)}")
            for fleet in order:
                clients = args.clients_per_node * (args.nodes if fleet.name == "single-all" else 1)
                measure(fleet, upstream, image, clients, args.timeout, results, rep)
    finally:
        for server in [*fleets, upstream]:
            if server is None:
                continue
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {getattr(server, 'label', 'upstream')}: {exc!r}")
        stop_all_processes()
    results.elapsed = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    results = run(args)
    print(render_text(results))
    command = " ".join(["python -m bench.fleet"] + (sys.argv[1:] if argv is None else list(argv)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(results, datetime.datetime.now(datetime.timezone.utc), command.strip()))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
