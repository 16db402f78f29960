"""Build script for internvl3_engine and its compiled extension ``internvl3_engine._C``.

Build variants (one-line message printed at build time says which was chosen and why):
  INTERNVL3_ENGINE_BUILD=auto (default)  CUDA when torch is a CUDA build and a CUDA toolkit is found, else CPU
  INTERNVL3_ENGINE_BUILD=cuda            CUDA kernels + C++ CPU kernels; fails if no toolkit is found
  INTERNVL3_ENGINE_BUILD=cpu             C++ CPU kernels only
  INTERNVL3_ENGINE_BUILD=none            pure Python (Triton and PyTorch backends only)
CUDA_HOME (or CUDA_PATH) names the toolkit; without it the toolkit is located from `nvcc --dryrun`,
which reports the folder of the real nvcc even when the one on PATH is a wrapper script elsewhere.
TORCH_CUDA_ARCH_LIST overrides the default GPU architectures (8.0 and 9.0).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from cuda_toolkit import find_cuda_toolkit  # noqa: E402  (beside this file; not part of the package)

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _log(message: str) -> None:
    print(f"internvl3_engine build: {message}", file=sys.stderr, flush=True)


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of the NVIDIA wheels a pip-installed CUDA torch depends on (nvidia/cu13/include,
    ...). ATen's CUDA headers include cuSPARSE, cuBLAS, ... headers that a minimal toolkit may lack; they
    are added as system include folders, searched after the toolkit's own."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for location in spec.submodule_search_locations:
        found.extend(sorted(glob.glob(os.path.join(location, "*", "include"))))
    return found


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def extension_modules():
    variant = os.environ.get("INTERNVL3_ENGINE_BUILD", "auto").lower()
    if variant not in ("auto", "cuda", "cpu", "none"):
        raise SystemExit(f"INTERNVL3_ENGINE_BUILD must be auto, cuda, cpu or none, got {variant!r}")
    if variant == "none":
        _log("pure-Python build (INTERNVL3_ENGINE_BUILD=none): no compiled extension")
        return [], {}

    import torch

    use_cuda, reason = False, ""
    if variant in ("auto", "cuda"):
        toolkit, how = find_cuda_toolkit()
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is not a CUDA build"
        elif toolkit is None:
            reason = how
        else:
            # torch.utils.cpp_extension reads CUDA_HOME when imported: set it before the import below.
            os.environ["CUDA_HOME"] = toolkit
            use_cuda, reason = True, f"toolkit {toolkit} ({how}), torch CUDA {torch.version.cuda}"
        if variant == "cuda" and not use_cuda:
            raise SystemExit(f"INTERNVL3_ENGINE_BUILD=cuda but no CUDA build is possible: {reason}")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"CUDA build for archs {archs}: {reason}")
        define = [("INTERNVL3_ENGINE_WITH_CUDA", "1"), ("INTERNVL3_ENGINE_CUDA_ARCHS", f'"{archs}"')]
        system_includes = [flag for folder in _pip_cuda_include_dirs() for flag in ("-isystem", folder)]
        ext = CUDAExtension(
            "internvl3_engine._C",
            _sources("*.cpp") + _sources("*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define,
            extra_compile_args={
                "cxx": cxx_flags + system_includes,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + system_includes,
            },
        )
    else:
        _log(f"CPU-only C++ build: {reason or 'INTERNVL3_ENGINE_BUILD=cpu'}")
        ext = CppExtension(
            "internvl3_engine._C",
            _sources("*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["internvl3_engine", "internvl3_engine.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
