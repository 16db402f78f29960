"""Benchmarks of internvl3_engine's kernels against PyTorch eager, with the machine's ceilings measured in
the same run. Uses only internvl3_engine's public API. Run ``python -m bench --help``."""
