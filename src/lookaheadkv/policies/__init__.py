"""Scoring policies, one per file, and the registry of their command-line names."""

from __future__ import annotations

import dataclasses

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


def _option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def split_method(spec: str) -> tuple[str, dict]:
    """A method spec: a registry name, optionally with options, ``name:key=value:key=value``.

    ``"lookahead:kernel=7:window=16"`` -> ``("lookahead", {"kernel": 7, "window": 16})``: a variant
    of a policy compared beside its default in one evaluation (its rows are recorded under the
    whole spec). Values are read as int, float, true/false, else text; a key that is not one of the
    policy's parameters (budget excluded: the run sets it) gets a one-line error listing them.
    """
    name, *options = str(spec).split(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(sorted(REGISTRY))}")
    fields = {f.name: f.default for f in dataclasses.fields(REGISTRY[name]) if f.name != "budget"}
    kwargs = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or key not in fields or not text:
            hint = ", ".join(sorted(fields)) if fields else "none"
            raise ValueError(f"bad option {option!r} in method {spec!r}: write {name}:key=value with key one of: {hint}")
        value, default = _option_value(text), fields[key]
        expected = type(default) if isinstance(default, (bool, int, float)) else None
        ok = expected is None or (isinstance(value, bool) if expected is bool else (isinstance(value, (int, float)) and not isinstance(value, bool) and (expected is float or isinstance(value, int))))
        if not ok:
            what = {bool: "true or false", int: "a whole number", float: "a number"}[expected]
            raise ValueError(f"bad option {option!r} in method {spec!r}: {key} takes {what}")
        kwargs[key] = value
    return name, kwargs


def make_policy(name: str, **kwargs) -> Policy:
    """Build a policy from its registry name or a spec with options (:func:`split_method`); unknown
    names get a one-line error listing the known ones. Options in the spec win over ``kwargs``."""
    base, options = split_method(name)
    return REGISTRY[base](**{**kwargs, **options})


__all__ = ["Policy", "FullKV", "RandomPolicy", "StreamingLLM", "SnapKV", "PyramidKV", "H2O", "TOVA", "LookaheadKV", "LAQ", "SpecKV", "Oracle", "REGISTRY", "make_policy", "split_method", "SharedPrefill"]
