"""The two pull-through caches under test, behind one small interface: where to GET, how to start
over with an empty cache, when a blob is committed, and how much memory the server has used."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from bench.image import REPOSITORY, TAG, BenchImage
from bench.measure import peak_rss_bytes, rss_bytes
from tests.servers.pullthrough import Pullthrough
from tests.servers.registry import Distribution


class Proxy:
    """A cache in front of the benchmark upstream. Subclasses wrap one server class each."""

    name: str
    label: str
    cold_path_only = False  # a variant that differs only on the cold path: left out of warm and manifest runs

    def __init__(self, image: BenchImage) -> None:
        self.image = image
        # (what the instance did, its VmHWM): one entry per server instance, read before it stops.
        self.peak_rss: list[tuple[str, int]] = []
        self.idle_rss: list[int] = []  # VmRSS a second after each start, before any request
        self.phase = "idle start"

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def committed_path(self, digest: str) -> Path:
        raise NotImplementedError

    def _restart_empty(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def blob_url(self) -> str:
        return f"{self.url}/v2/{REPOSITORY}/blobs/{self.image.layer_digest}"

    def manifest_url(self, reference: str) -> str:
        return f"{self.url}/v2/{REPOSITORY}/manifests/{reference}"

    @property
    def manifest_tag_url(self) -> str:
        return self.manifest_url(TAG)

    @property
    def manifest_digest_url(self) -> str:
        return self.manifest_url(self.image.manifest_digest)

    def record_rss(self) -> None:
        if self.pid is not None:
            self.peak_rss.append((self.phase, peak_rss_bytes(self.pid)))

    def fresh(self, phase: str) -> None:
        """Stop, wipe the whole cache (blobs and index), start again: the next GET is cold.
        `phase` names what the new instance will be used for, in the RSS record."""
        self.record_rss()
        self._restart_empty()
        self.record_idle_rss()
        self.phase = phase

    def record_idle_rss(self) -> None:
        if self.pid is not None:
            time.sleep(1.0)  # whatever the server does right after it answers its first health check
            self.idle_rss.append(rss_bytes(self.pid))

    def max_rss(self) -> tuple[str, int]:
        return max(self.peak_rss, key=lambda entry: entry[1])

    def wait_committed(self, digest: str, timeout: float = 300.0) -> float:
        """Wait until the cache holds `digest` as a committed file; returns seconds waited."""
        path = self.committed_path(digest)
        started = time.monotonic()
        while not path.exists():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.label}: {digest} not committed at {path} after {timeout}s")
            time.sleep(0.05)
        return time.monotonic() - started


class DistributionProxy(Proxy):
    """distribution (docker-registry 2.8) with `proxy: remoteurl`, the reference cache."""

    name = "distribution"
    label = "distribution proxy"

    def __init__(self, image: BenchImage, workdir: Path, upstream_url: str) -> None:
        super().__init__(image)
        # The blob descriptor cache is on in the config distribution ships with; measure that.
        self.server = Distribution.start(workdir, proxy_remote_url=upstream_url,
                                         extra_config={"storage": {"cache": {"blobdescriptor": "inmemory"}}})

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        proc = getattr(self.server, "_proc", None)
        return proc.pid if proc is not None else None

    def committed_path(self, digest: str) -> Path:
        return self.server.blob_data_path(digest)

    def _restart_empty(self) -> None:
        # Restart as well as wipe: distribution keeps descriptors in memory.
        self.server.stop()
        shutil.rmtree(self.server.storage_dir, ignore_errors=True)
        self.server.restart()

    def stop(self) -> None:
        self.server.stop()


class PullthroughProxy(Proxy):
    """pullthrough itself, configured with the benchmark upstream as its default registry."""

    name = "pullthrough"
    label = "pullthrough"
    settings: ClassVar[Mapping[str, object]] = {}  # beside the defaults

    def __init__(self, image: BenchImage, workdir: Path, upstream_url: str) -> None:
        super().__init__(image)
        registries = [{"name": "bench.local", "url": upstream_url, "default": True, "tag_ttl": "1h"}]
        self.server = Pullthrough.start(workdir / "cache", registries, workdir=workdir / "run", **self.settings)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def committed_path(self, digest: str) -> Path:
        return self.server.blob_path(digest)

    def _restart_empty(self) -> None:
        self.server.stop()
        shutil.rmtree(self.server.cache_dir, ignore_errors=True)
        self.server.cache_dir.mkdir(parents=True)
        self.server.restart()

    def stop(self) -> None:
        self.server.stop()


class DropBehindProxy(PullthroughProxy):
    """pullthrough with `drop_behind = true`: a fill keeps only its tail in the page cache. Only the
    cold path differs (the cold GET, the first GET after it, 8 concurrent cold GETs), so the
    warm and manifest runs leave it out."""

    name = "pullthrough-drop"
    label = "pullthrough drop"
    settings = {"drop_behind": True}
    cold_path_only = True


PROXIES = {"pullthrough": PullthroughProxy, "pullthrough-drop": DropBehindProxy, "distribution": DistributionProxy}
