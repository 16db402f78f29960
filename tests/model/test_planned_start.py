"""The planner recommends only plans this trainer can start: a subset of the planner's candidate plans for
the tiny model on 4 GPUs (2 a node, so HSDP is among them) covering every choice it makes (each component's
sharding and activation checkpointing, every tensor- and context-parallel degree, every replica count), written as its
--save writes them, each trains a step through the trainer on 4 gloo ranks, holding the parameter bytes
the planner predicts for a start."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from internvl3_engine.planner import GPUS, model_shape, start_memory_bytes
from internvl3_engine.planner.search import candidate_plans, recommend
from model import InternVL3Config
from model.train.demo_data import DemoDataConfig, generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD = 4
SETTINGS = {
    "model": {"preset": "tiny"}, "cpu_threads": 1, "device": "cpu", "max_steps": 1,
    "data": {"system_message": None, "max_packed_tokens": 256, "max_tiles": 8, "max_buffers": 2, "max_num": 1, "num_workers": 0},
    "logging": {"log_every": 1, "log": []}, "checkpoint": {"save_every": 100},
}


def covering(plans) -> list:
    """Plans until every (choice, value) the candidates take has appeared once."""
    def choices(plan):
        return {("tp", plan.tp), ("cp", plan.cp), ("dp_replicate", plan.dp_replicate)} | {
            (f"{name}.{field}", getattr(plan.component(name), field))
            for name in ("vision", "projector", "language") for field in ("sharding", "activation_checkpointing")
        }

    chosen, seen = [], set()
    for plan in plans:
        if choices(plan) - seen:
            chosen.append(plan)
            seen |= choices(plan)
    return chosen


def test_the_planners_plans_start_in_the_trainer(tmp_path):
    tiny = InternVL3Config.preset("tiny")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(tiny.to_hf()))
    shape = model_shape(tmp_path / "model" / "config.json")
    gpu = dataclasses.replace(GPUS["h100"], gpus_per_node=2)
    candidates, _ = candidate_plans(shape, WORLD, gpu)
    best = recommend(shape, WORLD, gpu).best.plan
    plans = covering([best, *candidates])
    assert {plan.dp_replicate for plan in plans} == {1, 2} and {plan.tp for plan in plans} >= {1, 2}
    assert {plan.cp for plan in plans} == {1, 2}
    (tmp_path / "plans.json").write_text(json.dumps([plan.to_dict() for plan in plans]))
    generate(str(tmp_path / "data"), seed=0, config=DemoDataConfig(train_images=8, eval_images=1, preference_pairs=1, image_size=56, train_videos=0, eval_videos=0))
    settings = {**SETTINGS, "data": {**SETTINGS["data"], "path": str(tmp_path / "data" / "meta.json")}, "output_dir": str(tmp_path / "runs")}
    (tmp_path / "config.json").write_text(json.dumps(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               os.path.join(ROOT, "tests", "model", "planned_start_worker.py"),
               str(tmp_path / "plans.json"), str(tmp_path / "config.json"), str(tmp_path / "results.json")]
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(plans)
    for plan, result in zip(plans, results):
        assert result["plan"] == plan.to_dict()
        assert len(result["losses"]) == 1 and result["losses"][0] is not None, result
        # Rank 0's parameter bytes (float32 shards; the planner counts parameters evenly split, FSDP2 pads
        # rank 0's shard up): within 10% of the planner's start prediction.
        assert result["parameter_bytes"] == pytest.approx(start_memory_bytes(shape, plan, WORLD), rel=0.1), plan
