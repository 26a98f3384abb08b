"""Settings: one object built once from flags, PULLTHROUGH_* variables, a TOML file and defaults.

Precedence is flag > environment > file > default; a bad value is one readable line naming the key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pytimeparse2
from pydantic import (
    BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

_DURATION_HINT = "a duration such as '24h', '5m', '1h30m', '500ms' or a number of seconds"
_SIZE_HINT = "a size such as '500GB' (10^9 bytes), '500GiB' (2^30 bytes), '50G' (= 50GB) or a number of bytes"
_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)
_SIZE_TEXT = re.compile(r"\d*\.?\d+ *[A-Za-z]*")
_SIZE_NUMBER = re.compile(r"\d*\.?\d+")
_KUBERNETES_BINARY = re.compile(r"(\d*\.?\d+ *)([KMGTPE])i", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """'24h', '5m', '1h30m', '1.5h', '500ms', '0s', or a number of seconds -> seconds (pytimeparse2)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_HINT}")
    if isinstance(value, (int, float)):
        seconds: float | None = float(value)
    elif isinstance(value, str):
        text = value.strip()
        seconds = float(text) if _is_number(text) else pytimeparse2.parse(text)
    else:
        raise ValueError(f"expected {_DURATION_HINT}")
    if seconds is None:
        raise ValueError(f"{value!r} is not {_DURATION_HINT}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return float(seconds)


Duration = Annotated[float, BeforeValidator(parse_duration)]


def parse_size(value: Any) -> int:
    """'500GB' (10^9), '500GiB' (2^30), '50G' (decimal, as Kubernetes reads it), or a number of
    bytes -> bytes (pydantic's ByteSize: decimal and binary units both as their standards say)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {_SIZE_HINT}")
    if isinstance(value, (int, float)) and value < 0 or isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError("a size cannot be negative")
    # ByteSize reads only as far as it understands ('1.5.2GB' would be 1 byte): the whole text must be a size.
    if isinstance(value, str) and not _SIZE_TEXT.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not {_SIZE_HINT}")
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and (kubernetes := _KUBERNETES_BINARY.fullmatch(text)):
        text = f"{kubernetes.group(1)}{kubernetes.group(2)}iB"  # '100Gi', '1Ti' as Kubernetes writes them
    try:
        size = int(_BYTE_SIZE.validate_python(text))
    except ValidationError:
        raise ValueError(f"{value!r} is not {_SIZE_HINT}") from None
    if size == 0 and float(_SIZE_NUMBER.match(str(text)).group(0)) != 0:  # type: ignore[union-attr]
        raise ValueError(f"{value!r} is less than one byte")  # max_size = 0.5 would evict everything
    return size


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


Size = Annotated[int, BeforeValidator(parse_size)]

# Where a purge lifetime (`ttl`, `default_ttl`) counts from: the last read (a blob read daily never
# goes) or the download (the seed's "24 hours from the moment it is downloaded", however often read).
TtlFrom = Literal["access", "download"]


def _without_credentials(value: Any) -> Any:
    """An upstream URL names a host, never a user or password: those would reach metric labels,
    logs and error lines, and each source has keys of its own for credentials. The value is not
    repeated in the error, since it holds a secret."""
    if isinstance(value, str) and "@" in urlsplit(value.strip()).netloc:
        raise ValueError("must not carry a user name or password (give them in their own keys, e.g. password_env)")
    return value


UpstreamUrl = Annotated[str, BeforeValidator(_without_credentials)]

_REGISTRY_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$")

DOCKER_HUB = "docker.io"
# The host names Docker's own tools and the seed's listings write for Docker Hub.
DOCKER_HUB_ALIASES = ("registry.hub.docker.com", "index.docker.io", "registry-1.docker.io")


class RegistryConfig(BaseModel):
    """One upstream registry and the name clients use for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    url: UpstreamUrl
    default: bool = False
    tag_ttl: Duration = 300.0
    ttl: Duration | None = None  # unused blobs from this registry are purged after this (default_ttl if unset)
    ttl_from: TtlFrom | None = None  # what `ttl` counts from (the top-level ttl_from if unset)
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    # Hosts (besides the registry's own) that may receive the credentials when a
    # token challenge names them as realm: Docker Hub's realm is auth.docker.io.
    auth_realm_hosts: tuple[str, ...] = ()
    # Other names clients may use for this registry (in image names, ?ns= and path prefixes). A
    # registry named docker.io has Docker's own unless it sets them: DOCKER_HUB_ALIASES.
    aliases: tuple[str, ...] = ()
    # How long a referrers list (OCI 1.1, GET /v2/<name>/referrers/<digest>) is trusted before it is
    # asked again: a signature or SBOM pushed later must show up soon.
    referrers_ttl: Duration = 60.0

    @model_validator(mode="before")
    @classmethod
    def _docker_hub_aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") == DOCKER_HUB and "aliases" not in data:
            return {**data, "aliases": DOCKER_HUB_ALIASES}
        return data

    @model_validator(mode="after")
    def _check(self) -> RegistryConfig:
        if not _REGISTRY_NAME.match(self.name):
            raise ValueError(f"registry name {self.name!r} must look like a host name (docker.io, ghcr.io)")
        for alias in self.aliases:
            if not _REGISTRY_NAME.match(alias):
                raise ValueError(f"alias {alias!r} of {self.name} must look like a host name (index.docker.io)")
        if len({self.name, *self.aliases}) != 1 + len(self.aliases):
            raise ValueError(f"aliases of {self.name} repeat a name")
        if not re.match(r"^https?://[^/\s]+/?$", self.url):
            raise ValueError(f"registry url {self.url!r} must be http(s)://host[:port]")
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        return self

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name clients may use for this registry, its own first."""
        return (self.name, *self.aliases)

    @property
    def is_docker_hub(self) -> bool:
        """Docker Hub's single names mean library/ (alpine is library/alpine), under any of its names."""
        return DOCKER_HUB in self.names

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) when configured; the password read from its variable at call time."""
        if self.username is None:
            return None
        if self.password_env is not None:
            return self.username, os.environ.get(self.password_env, "")
        return self.username, self.password.get_secret_value() if self.password else ""


def _default_registries() -> list[RegistryConfig]:
    return [
        RegistryConfig(
            name="docker.io", url="https://registry-1.docker.io", default=True, auth_realm_hosts=("auth.docker.io",)
        ),
        RegistryConfig(name="ghcr.io", url="https://ghcr.io"),
        RegistryConfig(name="quay.io", url="https://quay.io"),
        RegistryConfig(name="registry.k8s.io", url="https://registry.k8s.io"),
        RegistryConfig(name="nvcr.io", url="https://nvcr.io", auth_realm_hosts=("authn.nvidia.com",)),
        RegistryConfig(name="public.ecr.aws", url="https://public.ecr.aws"),
    ]


class HfConfig(BaseModel):
    """The Hugging Face Hub mirror."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: UpstreamUrl = "https://huggingface.co"
    revision_ttl: Duration = 300.0  # how long a branch or tag -> commit answer is trusted
    access_ttl: Duration = 60.0  # how long a caller's token is trusted for a gated or private repo
    ttl: Duration | None = None  # unused model files are purged after this (default_ttl if unset)
    ttl_from: TtlFrom | None = None  # what `ttl` counts from (the top-level ttl_from if unset)
    token_env: str | None = None  # a service token for public repos' metadata, read from this variable
    # "native": the mirror speaks Xet (proxy/sources/hf/xet*): its own CAS URL, chunk-level caching.
    # "strip": Xet fields and headers are removed, so clients download through resolve (plain HTTP).
    xet: Literal["native", "strip"] = "native"
    # Native Xet: the variable holding the key that signs the mirror's Xet tokens and xorb URLs (at
    # least 32 characters). Unset: a key per process, so a client the load balancer moves to another
    # node of a fleet must fetch a new token there; set the same key on every node to avoid that.
    xet_token_key_env: str | None = None

    @model_validator(mode="after")
    def _check(self) -> HfConfig:
        if not re.match(r"^https?://[^/\s]+/?$", self.url):
            raise ValueError(f"hf url {self.url!r} must be http(s)://host[:port]")
        if self.xet == "native":
            self.xet_token_key()  # a key that is missing or short is refused at start, not at the first client
        return self

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    def service_token(self) -> str | None:
        return os.environ.get(self.token_env) or None if self.token_env else None

    def xet_token_key(self) -> bytes | None:
        """The shared key for the mirror's Xet tokens, or None (a key per process)."""
        if not self.xet_token_key_env:
            return None
        key = os.environ.get(self.xet_token_key_env, "")
        if len(key) < 32:
            raise ValueError(f"xet_token_key_env: ${self.xet_token_key_env} must hold a key of at least 32 characters")
        return key.encode()


class S3Bucket(BaseModel):
    """A bucket the mirror may serve, with its own endpoint or credentials where they differ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    endpoint_url: UpstreamUrl | None = None
    region: str | None = None
    access_key_id: str | None = None
    access_key_id_env: str | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_env: str | None = None
    # A public bucket: requests go unsigned, so no key (the section's, or the AWS chain's: the
    # node's own role) is ever shown to a bucket someone else owns.
    anonymous: bool = False

    @model_validator(mode="after")
    def _check(self) -> S3Bucket:
        own_keys = (self.access_key_id, self.access_key_id_env, self.secret_access_key, self.secret_access_key_env)
        if self.anonymous and any(value is not None for value in own_keys):
            raise ValueError("an anonymous bucket takes no keys")
        return self


class S3Config(BaseModel):
    """S3 and S3-compatible object stores. Only listed buckets are served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: UpstreamUrl | None = None  # any S3-compatible endpoint; None: AWS
    region: str = "us-east-1"
    access_key_id: str | None = None  # none anywhere: the standard AWS credential chain
    access_key_id_env: str | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_env: str | None = None
    object_ttl: Duration = 300.0  # how long key -> version is trusted before a HeadObject
    ttl: Duration | None = None  # unused objects are purged after this (default_ttl if unset)
    ttl_from: TtlFrom | None = None  # what `ttl` counts from (the top-level ttl_from if unset)
    buckets: list[S3Bucket] = Field(default_factory=list)

    def bucket(self, name: str) -> S3Bucket | None:
        return next((b for b in self.buckets if b.name == name), None)

    def credentials(self, bucket: S3Bucket) -> dict[str, str]:
        """boto3 client arguments for this bucket: its own values over the section's."""
        key_id = _value(bucket.access_key_id, bucket.access_key_id_env) or _value(self.access_key_id, self.access_key_id_env)
        secret = _secret(bucket.secret_access_key, bucket.secret_access_key_env) or _secret(
            self.secret_access_key, self.secret_access_key_env
        )
        args = {"region_name": bucket.region or self.region}
        endpoint = bucket.endpoint_url or self.endpoint_url
        if endpoint:
            args["endpoint_url"] = endpoint
        if bucket.anonymous:
            return args  # unsigned (S3Clients): no keys
        if key_id and secret:
            args["aws_access_key_id"], args["aws_secret_access_key"] = key_id, secret
        return args


def _value(value: str | None, env: str | None) -> str | None:
    return os.environ.get(env) if env else value


def _secret(value: SecretStr | None, env: str | None) -> str | None:
    if env:
        return os.environ.get(env)
    return value.get_secret_value() if value else None


class WebConfig(BaseModel):
    """Plain HTTP(S) URLs and IPFS gateways. Never an open proxy: only listed prefixes are fetched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: list[UpstreamUrl] = Field(default_factory=list)  # URL prefixes, e.g. "https://example.com/models/"
    ttl: Duration = 300.0  # how long a URL's answer is trusted before revalidation
    ipfs_gateways: list[UpstreamUrl] = Field(default_factory=list)  # tried in order, e.g. "https://ipfs.io"


class RemoteResource(BaseModel):
    """One remote resource of a set: S3 (object or prefix), HF (a repo at a revision), IPFS, HTTPS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["S3", "HF", "IPFS", "HTTPS"]
    url: str | None = None  # s3://bucket/key-or-prefix, https://…
    repo: str | None = None  # HF: org/name
    repo_type: Literal["model", "dataset", "space"] = "model"
    revision: str = "main"
    cid: str | None = None  # IPFS, optionally with /path

    @model_validator(mode="after")
    def _check(self) -> RemoteResource:
        needed = {"S3": "url", "HTTPS": "url", "HF": "repo", "IPFS": "cid"}[self.type]
        if getattr(self, needed) is None:
            raise ValueError(f"a {self.type} resource needs {needed}")
        if self.type == "S3" and not (self.url or "").startswith("s3://"):
            raise ValueError("an S3 resource's url starts with s3://")
        return self

    @property
    def display_url(self) -> str:
        """The resource as one URL, as the market listing shows it."""
        if self.type == "HF":
            prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
            return f"hf://{prefix}{self.repo}@{self.revision}"
        if self.type == "IPFS":
            return f"ipfs://{self.cid}"
        return str(self.url)


class ResourceSet(BaseModel):
    """A market's required resources: pinned (never purged) and prefetched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    images: list[str] = Field(default_factory=list)
    remote: list[RemoteResource] = Field(default_factory=list)
    platforms: list[str] = Field(default_factory=lambda: ["linux/amd64"])  # of multi-arch images
    # A subscription: the market's published listing (JSON in the seed's shape), read on start and
    # every `refresh`; what it lists joins `images` and `remote`, what leaves it is unpinned.
    url: UpstreamUrl | None = None
    refresh: Duration = 600.0

    @model_validator(mode="after")
    def _check(self) -> ResourceSet:
        if not re.match(r"^[A-Za-z0-9._-]{1,128}$", self.name):
            raise ValueError(f"resource set name {self.name!r} may hold letters, digits, . _ - only")
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"resource set url {self.url!r} must be http(s)://host/path")
        if self.refresh < 1:
            raise ValueError("a resource set's refresh is at least 1s")
        return self


LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"],
    BeforeValidator(lambda level: level.lower() if isinstance(level, str) else level),
]

# Index databases pullthrough speaks, and the module each one's driver needs (with the extra that
# installs it): anything else would pass as a URL and then fail on import at start-up.
_DATABASE_DRIVERS = {"sqlite": ("pysqlite", "sqlite3", None), "postgresql": ("psycopg", "psycopg", "postgres")}


def check_database_url(url: str) -> str:
    """The URL with its dialect's supported driver made explicit (postgresql:// -> postgresql+psycopg://);
    ValueError for a dialect or driver pullthrough cannot use, or a driver that is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("not a database URL (sqlite:///path or postgresql+psycopg://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend not in _DATABASE_DRIVERS:
        raise ValueError(f"{backend} is not supported: use sqlite:///path or postgresql+psycopg://user@host/db")
    driver, module, extra = _DATABASE_DRIVERS[backend]
    if "+" in parsed.drivername and parsed.get_driver_name() != driver:
        raise ValueError(f"the {parsed.get_driver_name()} driver is not supported: use {backend}+{driver}://")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{backend} needs the {module} module: pip install 'pullthrough[{extra}]'")
    if parsed.drivername == "postgresql":  # SQLAlchemy's default for it is psycopg2, which pullthrough does not use
        return f"postgresql+{driver}" + url.strip()[len("postgresql"):]
    return url


_NODE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")
_NODE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Settings(BaseSettings):
    """Everything pullthrough reads from its configuration, validated."""

    model_config = SettingsConfigDict(env_prefix="PULLTHROUGH_", extra="forbid", frozen=True)

    listen: str = "127.0.0.1:5000"
    cache_dir: Path = Path("/var/cache/pullthrough")
    database_url: str | None = None
    # A fill keeps only its last ~128 MiB in the page cache (proxy/store/dropbehind.py): a cold GET's time is
    # steadier and a big pull does not evict what is hot, but the first read after the fill reads from disk.
    drop_behind: bool = False
    default_ttl: Duration = 86400.0
    ttl_from: TtlFrom = "access"  # what default_ttl (and every ttl without its own) counts from: last read or download
    offline: bool = False  # serve only from the cache: no upstream is ever asked, a miss is the protocol's error
    max_size: Size | None = None  # evict least recently used blobs above this
    min_free: Size | None = None  # and while the cache's file system has less free space than this
    purge_interval: Duration = 600.0
    stats_interval: Duration = Field(default=10.0, ge=1, le=3600)  # counters saved and a dashboard point taken this often
    admin_token: SecretStr | None = None  # Bearer token for the admin endpoints; none: they are off
    admin_token_env: str | None = None
    public_stats: bool = True  # /stats, /metrics and the dashboard readable without the admin token
    log_level: LogLevel = "info"
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"  # json: one object per line (time, level, logger, message, fields)
    registries: list[RegistryConfig] = Field(default_factory=_default_registries)
    hf: HfConfig = Field(default_factory=HfConfig)
    s3: S3Config = Field(default_factory=S3Config)
    web: WebConfig = Field(default_factory=WebConfig)
    resource_sets: list[ResourceSet] = Field(default_factory=list)
    prefetch_on_start: bool = True
    # -- shutdown (SIGTERM or SIGINT) --------------------------------------------------------------
    drain_delay: Duration = 0.0  # /readyz answers 503 this long before the listener closes (a load balancer's probe period)
    shutdown_grace: Duration = 30.0  # then running transfers get this long to finish before they are cut
    # -- a fleet sharing one cache_dir and one PostgreSQL database ------------------------------
    node: str | None = None  # unique per node sharing the cache: names its temp files and counters (default: hostname)
    fill_lease: Duration = 15.0  # a filling node silent this long loses its download to another node
    follow_fills: Literal["stream", "commit"] = "stream"  # read another node's growing temp file, or wait for its commit
    # -- limits against slow and hostile clients ----------------------------------------------------
    max_connections: int = Field(default=4096, ge=16, le=1_000_000)  # beyond this, 503 at once
    header_timeout: Duration = 10.0  # a request's head must arrive whole within this
    keep_alive_timeout: Duration = 5.0  # an idle keep-alive connection is closed after this
    send_timeout: Duration = 60.0  # a client that takes no byte of a body for this long is dropped
    upstream_timeout: Duration = Field(default=60.0, gt=0)  # an upstream silent this long fails the attempt (connect: at most 10 s)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    max_head_size: Size = 64 * 1024  # request line and headers together
    # -- the store's worker threads, one bounded pool per kind of work ------------------------------
    fill_threads: int = Field(default=128, ge=1, le=4096)  # upstream transfers at once (each holds a thread)
    index_threads: int = Field(default=8, ge=1, le=64)  # index queries at once
    file_threads: int = Field(default=16, ge=1, le=256)  # file opens, syncs, renames and rehashes at once

    # Field validators, so that a bad value's message names its key (`listen: …`).
    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{listen!r} must be HOST:PORT")
        return listen

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        return check_database_url(url) if url is not None else None

    @field_validator("registries")
    @classmethod
    def _registries(cls, registries: list[RegistryConfig]) -> list[RegistryConfig]:
        names = [r.name for r in registries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"name {duplicates[0]!r} appears twice")
        if sum(r.default for r in registries) > 1:
            raise ValueError("only one registry may have default = true")
        owners: dict[str, str] = {}
        for registry in registries:
            for name in registry.names:
                if name in owners:
                    hint = " (docker.io has Docker's aliases unless it sets `aliases`)" if name in DOCKER_HUB_ALIASES else ""
                    raise ValueError(f"{name!r} names both {owners[name]} and {registry.name}: a name or alias "
                                     f"belongs to one registry{hint}")
                owners[name] = registry.name
        return registries

    @field_validator("node")
    @classmethod
    def _node(cls, node: str | None) -> str | None:
        if node is not None and not _NODE_NAME.fullmatch(node):
            raise ValueError(f"{node!r}: use letters, digits, '.', '_' and '-' (at most 200)")
        return node

    @field_validator("fill_lease")
    @classmethod
    def _fill_lease(cls, seconds: float) -> float:
        if seconds < 1:
            raise ValueError("must be at least 1s")
        return seconds

    @property
    def node_name(self) -> str:
        return self.node or _NODE_NAME_UNSAFE.sub("_", socket.gethostname())[:200]

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def admin_secret(self) -> str | None:
        if self.admin_token_env:
            return os.environ.get(self.admin_token_env) or None
        return self.admin_token.get_secret_value() if self.admin_token else None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.cache_dir / 'index.db'}"


class ConfigError(Exception):
    """A configuration problem, worded for one line on stderr."""


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings; overrides are command-line flags (None means not given)."""
    path = config_file or os.environ.get("PULLTHROUGH_CONFIG")
    if path is not None:
        _check_toml(Path(path))
    flags = {k: v for k, v in overrides.items() if v is not None}

    class _Sourced(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
            return tuple(sources)

    try:
        return _Sourced(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "config"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}"
