"""LASH's decoding for Hugging Face causal LMs."""

from lash.hf.generation import generate

__all__ = ["generate"]
