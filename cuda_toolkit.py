"""Locate the CUDA toolkit for the build (used by setup.py and CMakeLists.txt).

The nvcc on PATH may be a wrapper script outside its toolkit folder, which makes torch's guess of
CUDA_HOME (the parent of nvcc's folder) wrong. `nvcc --dryrun` prints the folder of the real nvcc
(`#$ _HERE_=...`), whose parent is the toolkit root. CUDA_HOME or CUDA_PATH, when set, win.

`python cuda_toolkit.py` prints the toolkit root (exit status 1 and the reason on stderr if none).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root of the nvcc that `nvcc` really runs, read from its --dryrun trace."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            trace = subprocess.run(
                [nvcc, "--dryrun", "-c", probe, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    for line in (trace.stdout + trace.stderr).splitlines():
        match = re.match(r"#\$ _HERE_=(.+)$", line.strip())
        if match:
            bin_dir = match.group(1).strip()
            root = os.path.dirname(bin_dir)
            if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
                return root
    return None


def find_cuda_toolkit() -> tuple[str | None, str]:
    """(toolkit root or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"{var}={os.environ[var]}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for candidate in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
            nvcc = candidate
            break
    if nvcc is None:
        return None, "no nvcc on PATH and CUDA_HOME unset"
    root = _toolkit_from_nvcc(nvcc)
    if root is None:
        return None, f"could not read the toolkit folder from `{nvcc} --dryrun`"
    return root, f"located from `{nvcc} --dryrun`"


if __name__ == "__main__":
    root, how = find_cuda_toolkit()
    if root is None:
        print(f"no CUDA toolkit: {how}", file=sys.stderr)
        sys.exit(1)
    print(root)
