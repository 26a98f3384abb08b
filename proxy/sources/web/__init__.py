"""Plain HTTP(S) URLs from an allow-list (/web/{url}) and IPFS content through gateways (/ipfs/{cid})."""

from proxy.sources.web.routes import WebMirror

__all__ = ["WebMirror"]
