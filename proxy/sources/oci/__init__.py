"""The OCI distribution API as a pull-through mirror of one or many upstream registries."""

from proxy.sources.oci.routes import OciMirror

__all__ = ["OciMirror"]
