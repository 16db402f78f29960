"""The parallelism scheduler on CPU with gloo: sharded training equals a single-process run on the same
global batch, for every combination of component shardings, at world sizes 2 and 4."""

from __future__ import annotations

import itertools
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from internvl3_engine.parallel import ComponentPlan, ParallelPlan, data_parallel_loss, parallelize
from internvl3_engine.parallel.checkpoint import load_sharded, save_sharded
from internvl3_engine.parallel.parallelize import build_meshes, find_blocks, find_components, set_prefetch

STEPS = 3
WIDTH = 8


class Stack(nn.Module):
    def __init__(self, width_in: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(width_in, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


class ThreeComponents(nn.Module):
    """A ViT stand-in over tiles, a projector, and an LLM stand-in over text rows followed by the
    projected tile rows."""

    def __init__(self):
        super().__init__()
        self.vision = Stack(6, WIDTH, 2)
        self.projector = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH))
        self.language = Stack(WIDTH, WIDTH, 3)

    def engine_components(self):
        return {"vision": self.vision, "projector": self.projector, "language": self.language}

    def forward(self, tiles, text):
        # A rank without images still runs the ViT, on a blank tile whose rows are dropped: every rank
        # takes part in the same collectives.
        blank = tiles.shape[0] == 0
        visual = self.projector(self.vision(tiles if not blank else torch.zeros(1, 6)))
        rows = torch.cat([text, visual[:0] if blank else visual])
        return self.language(rows)


def _global_batch(world_size: int):
    """Per-rank micro-batches (tiles, text rows, targets, weights); uneven images, some ranks none."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for rank in range(world_size):
        tiles = 0 if rank % 3 == 1 else 1 + 2 * rank
        text = 3 + rank
        rows = text + tiles
        batches.append((
            torch.randn(tiles, 6, generator=generator),
            torch.randn(text, WIDTH, generator=generator),
            torch.randn(rows, WIDTH, generator=generator),
            torch.rand(rows, generator=generator),
        ))
    return batches


def _sums(model, batch):
    tiles, text, target, weight = batch
    per_row = (model(tiles, text) - target).pow(2).mean(-1)
    return (weight * per_row).sum(), weight.sum()


def _single_process_reference(world_size: int):
    torch.manual_seed(0)
    model = ThreeComponents()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        sums = [_sums(model, batch) for batch in _global_batch(world_size)]
        loss = sum(s for s, _ in sums) / sum(w for _, w in sums)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _train_sharded(plan: ParallelPlan, meshes, rank: int, world_size: int):
    torch.manual_seed(0)
    model = ThreeComponents()
    parallelize(model, plan, mesh=meshes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _global_batch(world_size)[rank]
    for _ in range(STEPS):
        weighted, weight_sum = _sums(model, batch)
        loss = data_parallel_loss(weighted, weight_sum)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))


def _assert_states_close(state, reference, what):
    for name, expected in reference.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _worker(rank: int, world_size: int, init_file: str, checkpoint_dir: str, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        torch.set_num_threads(1)
        reference = _single_process_reference(world_size)
        meshes = build_meshes(ParallelPlan(), "cpu")
        for shardings in itertools.product(("replicate", "zero2", "zero3"), repeat=3):
            plan = ParallelPlan(**{name: ComponentPlan(sharding=s) for name, s in zip(("vision", "projector", "language"), shardings)})
            model, _ = _train_sharded(plan, meshes, rank, world_size)
            state = _full_state(model)
            if rank == 0:
                _assert_states_close(state, reference, f"world {world_size} {shardings}")
        # Checkpoints: world 2 saves one; world 4 loads it (resharding) and must hold the same weights.
        model, optimizer = _train_sharded(ParallelPlan(), meshes, rank, world_size)
        if world_size == 2:
            save_sharded(checkpoint_dir, model, optimizer)
        else:
            torch.manual_seed(1)
            fresh = ThreeComponents()
            parallelize(fresh, ParallelPlan(), mesh=meshes)
            load_sharded(checkpoint_dir, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
            state = _full_state(fresh)
            if rank == 0:
                _assert_states_close(state, _single_process_reference(2), "loaded from world 2")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _spawn(world_size: int, checkpoint_dir: str):
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(world_size, os.path.join(tmp, "init"), checkpoint_dir, errors), nprocs=world_size, join=True,
            start_method="spawn",
        )
    if not errors.empty():
        pytest.fail(errors.get())


def test_sharded_training_equals_single_process_and_checkpoints_reshard(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    _spawn(2, checkpoint)
    assert os.path.isdir(checkpoint) and not os.path.exists(checkpoint + ".tmp")
    _spawn(4, checkpoint)


def test_find_components_and_blocks():
    model = ThreeComponents()
    found = find_components(model)
    assert list(found) == ["vision", "projector", "language"]
    assert find_blocks(found["language"]) is model.language.layers
    assert find_blocks(found["projector"]) is None
    with pytest.raises(ValueError, match="missing"):
        find_components(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown names"):
        find_components(model, {**model.engine_components(), "audio": nn.Linear(1, 1)})


def test_prefetch_order_crosses_component_boundaries():
    class Recorder(nn.Module):
        def set_modules_to_forward_prefetch(self, modules):
            self.forward_prefetch = modules

        def set_modules_to_backward_prefetch(self, modules):
            self.backward_prefetch = modules

    modules = [Recorder() for _ in range(5)]
    set_prefetch(modules, 2)
    assert modules[0].forward_prefetch == modules[1:3] and not hasattr(modules[0], "backward_prefetch")
    assert modules[3].forward_prefetch == [modules[4]] and modules[3].backward_prefetch == [modules[2], modules[1]]
    assert not hasattr(modules[4], "forward_prefetch")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(tp=2), ValueError, "tp must be 1"),
        (dict(dp_replicate=0), ValueError, "dp_replicate must be an int >= 1"),
        (dict(prefetch=-1), ValueError, "prefetch must be an int >= 0"),
        (dict(vision="zero3"), TypeError, "vision must be a ComponentPlan"),
    ],
)
def test_bad_plans(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParallelPlan(**kwargs)


def test_bad_component_plan():
    with pytest.raises(ValueError, match="sharding must be one of"):
        ComponentPlan(sharding="zero1")
    with pytest.raises(TypeError, match="param_dtype"):
        ComponentPlan(param_dtype=torch.int8)
