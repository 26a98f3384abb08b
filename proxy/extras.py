"""The optional extras (`s3`, `ipfs`) and whether the configured sources have theirs installed.

Checked with importlib's finder, not an import: aioboto3 and botocore weigh ~25 MiB of memory.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from proxy.config import ConfigError, Settings


@dataclass(frozen=True)
class Extra:
    """An optional dependency group of the package and the module that shows it is installed."""

    name: str
    module: str


S3 = Extra("s3", "aioboto3")
IPFS = Extra("ipfs", "multiformats")


def installed(extra: Extra) -> bool:
    return importlib.util.find_spec(extra.module) is not None


def missing_extras(settings: Settings) -> list[str]:
    """One line per configured source whose extra is not installed, naming the key and the fix."""
    needed = []
    if settings.s3.buckets:
        needed.append(("s3.buckets", "S3 buckets are configured", S3))
    if settings.web.ipfs_gateways:
        needed.append(("web.ipfs_gateways", "IPFS gateways are configured", IPFS))
    return [
        f"{key}: {what} but the '{extra.name}' extra is not installed (pip install 'pullthrough[{extra.name}]')"
        for key, what, extra in needed
        if not installed(extra)
    ]


def require_extras(settings: Settings) -> None:
    """Raise ConfigError with the first missing extra's line (a config error: exit 2, one line)."""
    missing = missing_extras(settings)
    if missing:
        raise ConfigError(missing[0])
