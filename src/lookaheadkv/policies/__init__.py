"""Scoring policies, one per file, and the registry of their command-line names."""

from __future__ import annotations

from .base import Policy
from .full import FullKV
from .h2o import H2O
from .laq import LAQ
from .lookahead import LookaheadKV
from .oracle import Oracle
from .pyramidkv import PyramidKV
from .random import RandomPolicy
from .shared import SharedPrefill
from .snapkv import SnapKV
from .speckv import SpecKV
from .streamingllm import StreamingLLM
from .tova import TOVA

REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullKV, RandomPolicy, StreamingLLM, SnapKV, PyramidKV, H2O, TOVA, LookaheadKV, LAQ, SpecKV, Oracle)
}


def make_policy(name: str, **kwargs) -> Policy:
    """Build a policy from its registry name; unknown names get a one-line error listing the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kwargs)


__all__ = ["Policy", "FullKV", "RandomPolicy", "StreamingLLM", "SnapKV", "PyramidKV", "H2O", "TOVA", "LookaheadKV", "LAQ", "SpecKV", "Oracle", "REGISTRY", "make_policy", "SharedPrefill"]
