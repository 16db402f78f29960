"""Opt-in integrations of the engine with other libraries. Nothing here is imported by ``internvl3_engine``
itself: import the submodule you need (``internvl3_engine.integrations.transformers``)."""
