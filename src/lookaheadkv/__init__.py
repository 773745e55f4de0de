"""lookaheadkv: KV-cache eviction at prefill for Hugging Face causal LMs, with LookaheadKV."""

from .engine import Sampling, generate, generate_ids
from .lookahead import LookaheadModules
from .policies import H2O, LAQ, LookaheadKV, Oracle, SpecKV, TOVA, FullKV, PyramidKV, RandomPolicy, SnapKV, StreamingLLM, make_policy

__version__ = "0.1.0"

__all__ = ["Sampling", "generate", "generate_ids", "FullKV", "RandomPolicy", "StreamingLLM", "SnapKV", "PyramidKV", "H2O", "TOVA", "make_policy", "load_model", "LookaheadKV", "LookaheadModules", "LAQ", "SpecKV", "Oracle"]


def __getattr__(name):
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)
