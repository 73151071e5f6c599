"""executor: an offline batch executor for GGUF language models."""

__version__ = "0.1.0"
