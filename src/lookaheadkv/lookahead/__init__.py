"""The learned lookahead modules (soft tokens + lookahead-only LoRA), their save and load."""

from .modules import LookaheadConfig, LookaheadModules, ModulesError

__all__ = ["LookaheadConfig", "LookaheadModules", "ModulesError"]
