"""Settings: flag > environment > file > default, and one clear line for a bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings, parse_duration, parse_size


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_durations_accept_units_and_combinations() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("0s") == 0
    assert parse_duration(90) == 90
    assert parse_duration("500ms") == 0.5 and parse_duration("1.5h") == 5400 and parse_duration("90") == 90
    for bad in ["5 lightyears", "h", "-1s", "5x", "", True]:
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500GB", 500 * 10**9), ("500GiB", 500 * 2**30), ("500G", 500 * 10**9),  # a bare G is decimal, as in Kubernetes
        ("20gib", 20 * 2**30), ("1.5T", 1_500_000_000_000), ("1.5TiB", int(1.5 * 2**40)), ("64KiB", 65536),
        ("64k", 64_000), ("100MB", 10**8), ("100 MiB", 100 * 2**20), ("0", 0), ("12345", 12345), (4096, 4096),
        # Kubernetes' binary suffixes, which the hand-written parser took (a config using them must still load)
        ("100Gi", 100 * 2**30), ("1Ti", 2**40), ("500Mi", 500 * 2**20), ("2 Ki", 2048),
    ],
)
def test_sizes_take_decimal_and_binary_units_as_their_standards_say(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("5m", 300), ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("7d", 604800),
     ("2w", 1_209_600), ("30s", 30), ("30", 30), ("2.5", 2.5), (90, 90), ("0s", 0)],
)
def test_durations_take_units_fractions_and_combinations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["lots", "5 lightyears", "-1G", "G", "", "1.5.2GB", True, None, [1], "0.5", 0.5, "0.0001"])
def test_a_value_that_is_no_size_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_a_bad_size_in_the_config_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^max_size: 'lots' is not a size such as '500GB'"):
        load_settings(write(tmp_path / "c.toml", 'max_size = "lots"\n'))
    assert load_settings(write(tmp_path / "ok.toml", 'max_size = "500GB"\nmin_free = "20GiB"\n')).min_free == 20 * 2**30


def test_defaults_mirror_the_well_known_registries_with_docker_hub_as_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PULLTHROUGH_CONFIG", raising=False)
    settings = load_settings()
    names = [r.name for r in settings.registries]
    assert names == ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "nvcr.io", "public.ecr.aws"]
    assert [r.name for r in settings.registries if r.default] == ["docker.io"]
    assert settings.listen == "127.0.0.1:5000"
    assert settings.default_ttl == 86400
    assert settings.effective_database_url == f"sqlite:///{settings.cache_dir / 'index.db'}"


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'listen = "127.0.0.1:7001"\ncache_dir = "/from/file"\ndefault_ttl = "2h"\n')
    monkeypatch.setenv("PULLTHROUGH_CACHE_DIR", "/from/env")
    monkeypatch.setenv("PULLTHROUGH_LISTEN", "127.0.0.1:7002")
    settings = load_settings(config, listen="127.0.0.1:7003")
    assert settings.listen == "127.0.0.1:7003"  # flag
    assert settings.cache_dir == Path("/from/env")  # environment over file
    assert settings.default_ttl == 7200  # file over default


def test_config_file_may_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "c.toml",
        '[[registries]]\nname = "mirror.test"\nurl = "http://127.0.0.1:1"\ndefault = true\ntag_ttl = "0s"\n',
    )
    monkeypatch.setenv("PULLTHROUGH_CONFIG", str(config))
    settings = load_settings()
    assert [(r.name, r.tag_ttl, r.default) for r in settings.registries] == [("mirror.test", 0.0, True)]


def test_password_comes_from_its_variable_at_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "c.toml",
        '[[registries]]\nname = "a.test"\nurl = "https://a.test"\nusername = "u"\npassword_env = "A_PASS"\n',
    )
    monkeypatch.setenv("A_PASS", "s3cret")
    settings = load_settings(config)
    assert settings.registries[0].credentials() == ("u", "s3cret")
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listen = "nowhere"\n', "listen"),
        ('default_ttl = "soon"\n', "default_ttl"),
        ('cache_dirr = "/x"\n', "cache_dirr"),
        ('[[registries]]\nname = "a.test"\n', "registries.0.url"),
        ('[[registries]]\nname = "a.test"\nurl = "ftp://x"\n', "registries.0"),
        ('[[registries]]\nname="a"\nurl="http://a"\ndefault=true\n[[registries]]\nname="b"\nurl="http://b"\ndefault=true\n', "registries"),
        ("listen = \n", "config file {path}"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert str(error.value).startswith(key.format(path=path) + ": "), str(error.value)


def test_serve_with_bad_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'default_ttl = "soon"\n')
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pullthrough: default_ttl:")


def test_the_readme_config_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = load_settings(write(tmp_path / "c.toml", example))
    assert settings.registries[0].name == "docker.io" and settings.registries[0].default
    assert settings.hf.revision_ttl == 300


def test_node_names_that_could_not_name_a_temp_file_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PULLTHROUGH_CONFIG", raising=False)
    for bad in ["../etc", "a/b", ".hidden", "", "x" * 201, "gpu 7"]:
        monkeypatch.setenv("PULLTHROUGH_NODE", bad)
        with pytest.raises(ConfigError, match="node"):
            load_settings()
    monkeypatch.setenv("PULLTHROUGH_NODE", "gpu-07.rack_2")
    settings = load_settings(fill_lease="5s")
    assert settings.node_name == "gpu-07.rack_2" and settings.fill_lease == 5
    monkeypatch.delenv("PULLTHROUGH_NODE")
    assert load_settings().node_name  # the hostname, made safe
    with pytest.raises(ConfigError, match="fill_lease"):
        load_settings(fill_lease="0s")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[registries]]\nname = "docker.io"\nurl = "https://me:hunter2@registry.example"\n', "registries.0.url"),
        ('[hf]\nurl = "https://me:hunter2@hf.example"\n', "hf.url"),
        ('[s3]\nendpoint_url = "https://key:hunter2@s3.example"\n', "s3.endpoint_url"),
        ('[s3]\nbuckets = [{ name = "b", endpoint_url = "https://key:hunter2@s3.example" }]\n', "s3.buckets.0.endpoint_url"),
        ('[web]\nipfs_gateways = ["https://me:hunter2@ipfs.example"]\n', "web.ipfs_gateways.0"),
        ('[web]\nallow = ["https://me:hunter2@files.example/models/"]\n', "web.allow.0"),
    ],
)
def test_an_upstream_url_with_a_password_is_refused_without_repeating_it(tmp_path: Path, text: str, key: str) -> None:
    """A user and password in an upstream URL would reach metric labels, logs and error lines."""
    with pytest.raises(ConfigError) as refused:
        load_settings(write(tmp_path / "c.toml", text))
    assert str(refused.value).startswith(f"{key}: must not carry a user name or password")
    assert "hunter2" not in str(refused.value)


def test_native_xet_signs_with_the_fleets_shared_key_and_refuses_a_short_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One key on every node: a Xet token minted by one node opens on another."""
    from proxy.sources.hf.errors import HfError
    from proxy.sources.hf.xettokens import XetTokens

    config = tmp_path / "c.toml"
    config.write_text('[hf]\nxet = "native"\nxet_token_key_env = "XET_KEY"\n')
    monkeypatch.setenv("XET_KEY", "short")
    with pytest.raises(ConfigError, match=r"^hf: .*XET_KEY must hold a key of at least 32 characters"):
        load_settings(config)
    monkeypatch.setenv("XET_KEY", "k" * 40)
    key = load_settings(config).hf.xet_token_key()
    assert key == b"k" * 40
    token = XetTokens(key)._sign({"k": "t", "e": 2**40})
    assert XetTokens(key)._open(token, "t")["e"] == 2**40  # another node, the same key
    with pytest.raises(HfError, match="not a Xet token of this mirror"):
        XetTokens(None)._open(token, "t")  # a key of its own: refused
