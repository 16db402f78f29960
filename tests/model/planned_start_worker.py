"""torchrun worker of test_planned_start.py: one training step of the trainer under each plan of a JSON list
(plan files as `python -m internvl3_engine.planner --save` writes them), every rank; rank 0 writes each
run's loss and the parameter bytes it held to the output JSON.

    torchrun --nproc-per-node 4 tests/model/planned_start_worker.py PLANS.json CONFIG.json OUT.json
"""

import json
import os
import sys

import torch.distributed as dist

from internvl3_engine.parallel import ParallelPlan
from model.train.config import TrainConfig
from model.train.trainer import Trainer


def main(plans_file: str, config_file: str, out_file: str) -> None:
    with open(plans_file) as handle:
        plans = json.load(handle)
    with open(config_file) as handle:
        settings = json.load(handle)
    results = []
    for index, plan in enumerate(plans):
        config = TrainConfig().updated({**settings, "output_dir": os.path.join(settings["output_dir"], f"plan{index}")})
        trainer = Trainer(config, plan=ParallelPlan.from_dict(plan), show_progress=False, echo=lambda message: None)
        result = trainer.train()
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in trainer.model.parameters())
        results.append({"plan": plan, "losses": result.losses, "parameter_bytes": held})
    if dist.get_rank() == 0:
        with open(out_file, "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
