"""Writes scripts/constraints.txt: exact versions, from this environment, of every package that the
install and the tests need (the project's requirements and theirs, transitively), except torch and the CUDA
libraries torch brings (install.sh keeps an installed torch >= 2.11). scripts/install.sh installs under
these constraints, so a fresh install gets what was tested; upgrading one is a deliberate commit: upgrade
it here, run `bash scripts/test.sh`, then `python scripts/pin_dependencies.py` and commit the file.

    python scripts/pin_dependencies.py [--check]   (--check: exit 1 if the file differs from the environment)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import metadata

# What scripts/install.sh asks for (the project's dependencies and extras, the tests' packages).
ROOTS = (
    "ninja", "nvidia-ml-py", "numpy", "pillow", "tokenizers", "pyyaml", "safetensors", "transformers",
    "tensorboard", "torchdata", "av", "torchvision", "pytest", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm",
)
# Left to torch: pinning torch's own requirements (triton included) would fight an installed torch >= 2.11.
TORCH_OWNED = re.compile(r"^(torch|triton|nvidia-.*(?<!-ml-py)|cuda-.*|setuptools|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions)$")
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constraints.txt")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(distribution: metadata.Distribution) -> list[str]:
    """Names of the distribution's unconditional requirements (markers that hold here; no extras)."""
    from packaging.requirements import Requirement

    names = []
    for line in distribution.requires or ():
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(normalized(requirement.name))
    return names


def closure() -> dict[str, str]:
    pinned, pending = {}, [normalized(name) for name in ROOTS]
    while pending:
        name = pending.pop()
        if name in pinned or TORCH_OWNED.match(name):
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed: run bash scripts/install.sh first")
        pinned[name] = distribution.version
        pending.extend(requirement_names(distribution))
    return pinned


def render(pinned: dict[str, str]) -> str:
    header = "# Exact versions the tests passed with; written by scripts/pin_dependencies.py (see there).\n"
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if constraints.txt differs from this environment")
    text = render(closure())
    if parser.parse_args().check:
        with open(PATH, encoding="utf-8") as handle:
            sys.exit(0 if handle.read() == text else 1)
    with open(PATH, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
