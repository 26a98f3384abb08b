"""deploy/ as operators copy it: the example config lists every setting and loads, and the unit,
the image, the compose files and the Kubernetes manifests agree with the settings they run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from proxy.config import Settings, load_settings
from tests.conftest import require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXAMPLE = DEPLOY / "config.toml"

# In the example, a setting at its default (or an example value) is written `# key = value`, and a
# table not in use `# [name]` or `# [[name]]`: prose comments never look like either.
_COMMENTED_SETTING = re.compile(r"^# ?(?P<line>[a-z_]+ = \S.*|\[\[?[a-z0-9_.]+\]\]?)$")


def uncommented(text: str) -> str:
    """The example with every commented-out setting and table switched on."""
    return "\n".join(
        match.group("line") if (match := _COMMENTED_SETTING.match(line)) else line for line in text.splitlines()
    )


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The settings models inside a field's type (`list[RegistryConfig]`, `S3Config`, `X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, (typing._GenericAlias, types.GenericAlias, types.UnionType)) or typing.get_origin(annotation):  # type: ignore[attr-defined]
        return [model for arg in typing.get_args(annotation) for model in nested_models(arg)]
    return []


def missing_keys(model: type[BaseModel], tables: list[dict[str, Any]], path: str) -> list[str]:
    """Fields of `model` that none of `tables` (its occurrences in the example) sets, recursively."""
    missing = []
    for name, field in model.model_fields.items():
        present = [table[name] for table in tables if name in table]
        if not present:
            missing.append(f"{path}{name}")
            continue
        for inner in nested_models(field.annotation):
            values = [item for value in present for item in (value if isinstance(value, list) else [value])]
            missing += missing_keys(inner, [v for v in values if isinstance(v, dict)], f"{path}{name}.")
    return missing


def test_example_config_shows_every_setting_with_a_comment() -> None:
    text = EXAMPLE.read_text()
    everything = tomllib.loads(uncommented(text))
    assert not missing_keys(Settings, [everything], ""), "keys of proxy/config.py missing from deploy/config.toml"
    # Each setting's first appearance has a comment on its line or right above it.
    table, seen, undocumented = "", set(), []
    lines = uncommented(text).splitlines()
    original = text.splitlines()
    for number, line in enumerate(lines):
        if header := re.match(r"^\[\[?([a-z0-9_.]+)\]\]?", line):
            table = header.group(1)
        elif key := re.match(r"^([a-z_]+) = ", line):
            path = f"{table}.{key.group(1)}"
            if path not in seen:
                seen.add(path)
                above = original[number - 1] if number else ""
                prose_above = above.startswith("#") and not _COMMENTED_SETTING.match(above)
                if " # " not in original[number].partition("=")[2] and not prose_above:
                    undocumented.append(path)
    assert not undocumented, f"settings without a comment in deploy/config.toml: {undocumented}"


def test_example_config_loads_as_shipped_and_with_every_setting_switched_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = load_settings(EXAMPLE)
    assert shipped.listen == "0.0.0.0:5000" and shipped.cache_dir == Path("/var/cache/pullthrough")
    everything = tmp_path / "everything.toml"
    everything.write_text(uncommented(EXAMPLE.read_text()))
    monkeypatch.setenv("PULLTHROUGH_XET_KEY", "k" * 32)  # switched on, xet_token_key_env needs its key at start
    switched_on = load_settings(everything)  # a typo in a commented-out key or value fails here
    assert switched_on.s3.buckets and switched_on.resource_sets and switched_on.web.ipfs_gateways
    assert switched_on.hf.xet_token_key() == b"k" * 32


def test_example_config_passes_config_check() -> None:
    result = subprocess.run([shutil.which("pullthrough") or "pullthrough", "config", "check", "--config", str(EXAMPLE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- systemd -------------------------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_systemd_unit_is_hardened_and_outlasts_the_shutdown_grace() -> None:
    text = (DEPLOY / "pullthrough.service").read_text()
    assert "pip install pullthrough" not in text, "pullthrough is not published on PyPI"
    unit = unit_settings(text)
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["CacheDirectory"] == ["pullthrough"]  # writable under ProtectSystem=strict: the cache_dir
    assert unit["Restart"] == ["on-failure"] and unit["RestartPreventExitStatus"] == ["2"]
    config = load_settings(EXAMPLE)
    assert seconds(unit["TimeoutStopSec"][0]) > config.drain_delay + config.shutdown_grace
    assert int(unit["LimitNOFILE"][0]) >= 2 * config.max_connections + 256
    (command,) = unit["ExecStart"]
    assert command.split()[1:] == ["serve", "--config", "/etc/pullthrough/config.toml"]


def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = (DEPLOY / "pullthrough.service").read_text()
    (command,) = unit_settings(text)["ExecStart"]
    unit = tmp_path / "pullthrough.service"
    # verify checks that the command exists: the one a checkout's install puts there is not here.
    unit.write_text(text.replace(command.split()[0], shutil.which("true") or "/bin/true"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in result.stderr.splitlines() if str(unit) in line or "pullthrough.service" in line]
    assert result.returncode == 0 and not complaints, result.stderr


# -- container image and compose -------------------------------------------------------------------

def test_image_takes_its_settings_from_its_config_file_only() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    env_names = re.findall(r"\b(PULLTHROUGH_[A-Z_]+)=", dockerfile)
    assert env_names == ["PULLTHROUGH_CONFIG"], "an ENV setting would silently beat a mounted config"
    copied = re.search(r"^COPY deploy/config\.toml (\S+)$", dockerfile, re.M)
    assert copied and f"PULLTHROUGH_CONFIG={copied.group(1)}" in dockerfile
    assert re.search(r"^HEALTHCHECK .*127\.0\.0\.1:5000/livez", dockerfile, re.M | re.S)
    assert re.search(r"^EXPOSE 5000$", dockerfile, re.M) and 'VOLUME ["/var/cache/pullthrough"]' in dockerfile


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = re.findall(r"^COPY (.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = {source for line in copied for source in line.split()}
    assert sources <= admitted, sources - admitted


@pytest.mark.parametrize("compose", ["compose.yaml", "compose.fleet.yaml"])
def test_compose_mounts_a_config_it_agrees_with_and_waits_out_the_shutdown_grace(compose: str) -> None:
    spec = yaml.safe_load((DEPLOY / compose).read_text())
    for name, service in spec["services"].items():
        if service.get("image") != "pullthrough:latest":
            continue
        mounts = dict(reversed(volume.split(":")[:2]) for volume in service["volumes"])
        config = load_settings(DEPLOY / mounts[service["environment"]["PULLTHROUGH_CONFIG"]].removeprefix("./"))
        assert str(config.cache_dir) in mounts, f"{name}: cache_dir is not the cache volume"
        for published in service.get("ports", []):
            assert published.split(":")[-1] == str(config.port), f"{name}: {published} but listen {config.listen}"
        assert seconds(service["stop_grace_period"]) > config.drain_delay + config.shutdown_grace, name


# -- Kubernetes ------------------------------------------------------------------------------------

def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())


def test_kubernetes_service_keeps_each_pod_on_its_own_nodes_cache() -> None:
    assert manifest("service.yaml")["spec"]["internalTrafficPolicy"] == "Local"


def test_kubernetes_daemonset_probes_readiness_and_liveness_and_waits_out_the_grace() -> None:
    pod = manifest("daemonset.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    config = load_settings(DEPLOY / "kubernetes" / "config.toml")
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay + config.shutdown_grace
    # The ConfigMap replaces the image's config: it must say where to listen and what the cache is.
    assert config.port == container["ports"][0]["containerPort"] and config.host == "0.0.0.0"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert str(config.cache_dir) == mounts["cache"]
    assert not [e for e in container["env"] if e["name"] in ("PULLTHROUGH_LISTEN", "PULLTHROUGH_CACHE_DIR")]


# -- containerd ------------------------------------------------------------------------------------

def test_readme_documents_containerd_1_and_2_registry_config_path() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert '[plugins."io.containerd.grpc.v1.cri".registry]' in readme  # config version 2: containerd 1.x
    assert '[plugins."io.containerd.cri.v1.images".registry]' in readme  # config version 3: containerd 2.x
    assert "pullthrough serve --config" not in readme and "pullthrough config check --config" in readme


def test_containerd_reads_the_documented_1x_snippet(tmp_path: Path) -> None:
    """The installed containerd (Debian's 1.6) parses the version-2 snippet and keeps config_path.
    Version 3 needs containerd 2.x, which this machine does not have: only its text is checked."""
    containerd = require_tool("containerd")
    readme = (DEPLOY / "README.md").read_text()
    blocks = [textwrap.dedent(block) for block in re.findall(r"^( *```toml\n.*?^ *```)$", readme, re.S | re.M)]
    snippets = [block.split("\n", 1)[1].rpartition("```")[0] for block in blocks if "version = 2" in block]
    assert len(snippets) == 1, "deploy/README.md should show one containerd 1.x (version = 2) snippet"
    config = tmp_path / "containerd.toml"
    config.write_text(snippets[0])
    result = subprocess.run([containerd, "--config", str(config), "config", "dump"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    dumped = tomllib.loads(result.stdout)
    assert dumped["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
