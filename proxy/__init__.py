"""pullthrough: a pull-through cache for container images and ML models."""

__version__ = "0.1.0"
