"""WinTok hybrid visual tokenizer: the model alone (torch; transformers only for teachers)."""

from .checkpoint import CheckpointError, convert_checkpoint, load_model, save_pretrained
from .config import PRESETS, ConfigError, WinTokConfig, get_preset
from .wintok import WinTok

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "WinTok", "WinTokConfig",
    "convert_checkpoint", "get_preset", "load_model", "save_pretrained",
]
