"""The Hugging Face Hub API as a mirror: HF_ENDPOINT pointed at pullthrough serves models and datasets."""

from proxy.sources.hf.routes import HfMirror

__all__ = ["HfMirror"]
