"""model: a tiny-to-full InternVL3 built on internvl3_engine's public API, with its data pipeline and trainer.

Subpackages are imported on demand (``model.data`` for the data pipeline); importing ``model`` itself loads
nothing heavy.
"""
