"""Eviction inside other code's loops: Hugging Face's ``model.generate`` (:func:`evicting`) and a one-call pipeline (:func:`pipeline`)."""

from .hf import EvictedCache, EvictionPipeline, evicting, pipeline

__all__ = ["EvictedCache", "EvictionPipeline", "evicting", "pipeline"]
