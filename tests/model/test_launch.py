"""scripts/launch.sh (and through it scripts/train.sbatch's srun line): two "nodes" of one process each
rendezvous on 127.0.0.1 (c10d, gloo on the CPU) and train exactly as one node of two processes does. One node
takes its settings from SLURM's environment (a stand-in `scontrol` lists the job's hosts), the other from
the launcher's own variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from model.train.demo_data import DemoDataConfig, generate
from model.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--preset", "tiny", "--max-steps", "2", "--log-every", "1", "--save-every", "2", "--no-progress"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(output: Path) -> list[float]:
    return [entry["loss"] for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("launch_data")
    generate(str(folder), seed=0, config=DemoDataConfig(train_images=16, eval_images=2, preference_pairs=4, image_size=56, train_videos=0, eval_videos=0))
    return str(folder / "meta.json")


def test_two_nodes_train_as_one_node_of_two_processes(meta, tmp_path):
    base = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RDZV_", "NNODES", "NPROC"))}
    base.update(OMP_NUM_THREADS="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n# scontrol show hostnames <list>: the job's hosts, one a line\nprintf '127.0.0.1\\nnode-b\\n'\n")
    scontrol.chmod(0o755)
    port, output = free_port(), tmp_path / "nodes"
    slurm_node = {**base, "PATH": f"{bin_dir}{os.pathsep}{base['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NODELIST": "node-[a-b]", "RDZV_PORT": str(port), "NPROC_PER_NODE": "1"}
    plain_node = {**base, "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": "4242"}
    command = ["bash", str(ROOT / "scripts" / "launch.sh"), *FLAGS, "--data", meta, "--output-dir", str(output)]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in (slurm_node, plain_node)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    assert "node of 2, 1 processes, rendezvous 4242 at 127.0.0.1:" in logs[0] + logs[1]

    single_output = tmp_path / "one-node"
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "model.train", *FLAGS, "--data", meta, "--output-dir", str(single_output)],
                            cwd=ROOT, env=base, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    assert len(losses(output)) == 2 and losses(output) == losses(single_output)
    assert (output / "checkpoints" / "step_00000002" / "model").is_dir()


def test_launch_needs_a_rendezvous_it_can_reach(tmp_path):
    """A node alone (the other never comes) stops at torchrun's rendezvous timeout with a non-zero status:
    it does not hang."""
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": "alone", "RDZV_JOIN_TIMEOUT": "5", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    alone = subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), "--preset", "tiny", "--max-steps", "1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "RendezvousTimeoutError" in alone.stderr
