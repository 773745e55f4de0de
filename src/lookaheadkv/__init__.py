"""lookaheadkv: KV-cache eviction at prefill for Hugging Face causal LMs, with LookaheadKV.

The public names are imported on first use (PEP 562), so that ``import lookaheadkv`` and the
command line start without loading torch: a Ctrl-C in the first seconds of a command then ends
in the command's own one-line message instead of a traceback from an import.
"""

__version__ = "0.1.0"

_WHERE = {
    "Sampling": ".engine",
    "generate": ".engine",
    "generate_ids": ".engine",
    "generate_batch": ".engine",
    "generate_batch_ids": ".engine",
    "select_kv": ".engine",
    "evicting": ".integrations",
    "pipeline": ".integrations",
    "LookaheadModules": ".lookahead",
    "load_model": ".models",
    **{name: ".policies" for name in ("H2O", "LAQ", "LookaheadKV", "Oracle", "SpecKV", "TOVA", "FullKV", "PyramidKV", "RandomPolicy", "SnapKV", "StreamingLLM", "make_policy")},
}

__all__ = ["Sampling", "generate", "generate_ids", "generate_batch", "generate_batch_ids", "select_kv", "evicting", "pipeline", "FullKV", "RandomPolicy", "StreamingLLM", "SnapKV", "PyramidKV", "H2O", "TOVA", "make_policy", "load_model", "LookaheadKV", "LookaheadModules", "LAQ", "SpecKV", "Oracle"]


def __getattr__(name):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lookaheadkv' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
