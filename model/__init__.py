"""model: a tiny-to-full InternVL3 built on internvl3_engine's public API, with its data pipeline and trainer.

Subpackages are imported on demand (``model.data`` for the data pipeline); importing ``model`` itself loads
nothing heavy: ``model.InternVL3`` and the other names below import their module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "InternVL3": ".modeling",
    "InternVL3Output": ".modeling",
    "InternVL3Config": ".config",
    "VisionConfig": ".config",
    "ProjectorConfig": ".config",
    "TextConfig": ".config",
    "PRESETS": ".config",
    "generate": ".generation",
    "GenerationOutput": ".generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
