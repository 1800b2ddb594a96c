"""Tandem: a disaggregated, vLLM-V1-style LLM inference server."""

__version__ = "0.1.0"
