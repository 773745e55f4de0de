"""The learned lookahead modules (soft tokens + lookahead-only LoRA), their save and load, and the shipped ones."""

from .modules import BUNDLED_WEIGHTS, LookaheadConfig, LookaheadModules, ModulesError, default_modules_path

__all__ = ["BUNDLED_WEIGHTS", "LookaheadConfig", "LookaheadModules", "ModulesError", "default_modules_path"]
