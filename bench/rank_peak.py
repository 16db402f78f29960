"""Run a module as this process's main and, however it ends, write the process's peak RSS to
DIR/rank<RANK>.json (RANK from torchrun's environment): a rank's peak over everything it did, including
what it does after its own reports (bench.start's export).

    torchrun ... -m bench.rank_peak DIR MODULE [ARGS...]     # as ``torchrun ... -m MODULE ARGS``
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise ValueError("usage: python -m bench.rank_peak DIR MODULE [ARGS...]")
    folder, module, *args = argv
    rank = int(os.environ.get("RANK", "0"))
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump({"rank": rank, "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
