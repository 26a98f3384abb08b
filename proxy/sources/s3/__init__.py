"""S3 and S3-compatible object stores through the cache: /s3/{bucket}/{key} and prefix listings."""

from proxy.sources.s3.routes import S3Mirror

__all__ = ["S3Mirror"]
