"""The engine's ops, one folder per kernel family: reference.py (the spec), triton_kernel.py, op.py
(validation, backend dispatch, torch.library registration, autograd); their C++/CUDA kernels live in the
folder of the same name under csrc/, called through the functions of internvl3_engine/extension.py."""
