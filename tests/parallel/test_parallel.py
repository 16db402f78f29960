"""The parallelism scheduler on CPU with gloo: sharded training equals a single-process run on the same
global batch (its weights, its whole gradients of the first step and its gradient norm at every step), for
every combination of component shardings, at world sizes 2 and 4, with and without tensor parallelism of
the LLM and HSDP; checkpoints load across world sizes and tensor-parallel degrees."""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from internvl3_engine.parallel import (
    ComponentPlan, ParallelPlan, build_meshes, checkpoint_blocks, clip_grad_norm_, data_parallel_loss, load_sharded,
    parallelize, save_sharded,
)
from internvl3_engine.parallel.parallelize import find_blocks, find_components, set_prefetch
from internvl3_engine.parallel.tensor_parallel import check_tensor_parallel

STEPS = 3
WIDTH = 8
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 2
# Small enough that the gradients are clipped at every step: clipping across meshes is part of the check.
# Clipping and AdamW also make the weights blind to a gradient scaled by a constant factor, so the runs
# compare their gradients before clipping too.
MAX_NORM = 0.05


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


class Attention(nn.Module):
    """Qwen2's module names and GQA, causal over the rows; heads split with -1 (tensor-parallel ready)."""

    head_dim = HEAD_DIM

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, HEADS * HEAD_DIM)
        # No k bias: softmax is invariant to it, so its gradient is rounding noise that AdamW would amplify.
        self.k_proj = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)

    def forward(self, x):
        rows = x.shape[0]
        q, k, v = (proj(x).view(rows, -1, HEAD_DIM).transpose(0, 1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(0, 1).reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.up_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down_proj = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(WIDTH)
        self.self_attn = Attention()
        self.post_attention_layernorm = nn.RMSNorm(WIDTH)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """An LLM stand-in with Qwen2's block layout, so that tensor parallelism applies to it."""

    def __init__(self, depth: int):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.layers = nn.ModuleList(DecoderBlock() for _ in range(depth))
        self.norm = nn.RMSNorm(WIDTH)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ThreeComponents(nn.Module):
    """A ViT stand-in over tiles, a projector, and an LLM stand-in over text rows followed by the
    projected tile rows."""

    def __init__(self):
        super().__init__()
        self.vision = Stack(6, WIDTH, 2)
        self.projector = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH))
        self.language = Decoder(3)

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


@dataclass
class Training:
    """STEPS steps of AdamW: the model and optimizer after them, the gradient norm of each step before
    clipping, and the whole gradients of the first step (before clipping; DTensors gathered)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    norms: list[torch.Tensor]
    first_gradients: dict[str, torch.Tensor]


def _train(model, step_loss) -> Training:
    """STEPS steps of ``model`` on the loss ``step_loss(model)``, clipped to MAX_NORM."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norms, first_gradients = [], {}
    for step in range(STEPS):
        optimizer.zero_grad()
        step_loss(model).backward()
        if step == 0:
            first_gradients = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                               for name, p in model.named_parameters()}
        norms.append(clip_grad_norm_(model.parameters(), MAX_NORM))
        optimizer.step()
    return Training(model, optimizer, norms, first_gradients)


def _single_process_reference(dp_world_size: int) -> Training:
    """One process on the global batch of ``dp_world_size`` micro-batches, clipped at every step."""
    torch.manual_seed(0)

    def step_loss(model):
        sums = [_sums(model, batch) for batch in _global_batch(dp_world_size)]
        return sum(s for s, _ in sums) / sum(w for _, w in sums)

    reference = _train(ThreeComponents(), step_loss)
    assert all(norm > MAX_NORM for norm in reference.norms)
    return reference


def _train_sharded(plan: ParallelPlan, meshes) -> Training:
    """STEPS steps under ``plan``; each data-parallel rank (tensor-parallel peers alike) on its micro-batch."""
    torch.manual_seed(0)
    model = ThreeComponents()
    state = parallelize(model, plan, mesh=meshes)
    batch = _global_batch(state.dp_world_size)[state.dp_rank]
    return _train(model, lambda model: data_parallel_loss(*_sums(model, batch)))


def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False))


def _assert_states_close(state, reference, what):
    for name, expected in reference.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _assert_trains_as_one_process(state, training: Training, reference: Training, what: str) -> None:
    """The sharded run's weights (its full ``state``), first gradients and pre-clip gradient norms are the
    single process's (up to float32 summation order)."""
    _assert_states_close(state, reference.model.state_dict(), what)
    assert training.first_gradients.keys() == reference.first_gradients.keys()
    for name, expected in reference.first_gradients.items():
        torch.testing.assert_close(training.first_gradients[name], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{what} gradient of {name}: {m}")
    torch.testing.assert_close(torch.stack(training.norms), torch.stack(reference.norms), rtol=1e-5, atol=0,
                               msg=lambda m: f"{what} gradient norms: {m}")


def _worker(rank: int, world_size: int, init_file: str, checkpoint_dir: str, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        torch.set_num_threads(1)
        tp = 2
        layouts = [(1, 1), (1, tp), (2, 1)] + ([(2, tp)] if world_size >= 2 * tp else [])  # (dp_replicate, tp)
        meshes = {layout: build_meshes(ParallelPlan(dp_replicate=layout[0], tp=layout[1]), "cpu") for layout in layouts}
        shardings = ("replicate", "zero2", "zero3")
        plans = [
            ParallelPlan(**{name: ComponentPlan(sharding=s) for name, s in zip(("vision", "projector", "language"), combination)})
            for combination in itertools.product(shardings, repeat=3)
        ]
        # Tensor parallelism with each sharding of the LLM (and of the other components, in turn); HSDP
        # (two replica groups) alone and with tensor parallelism where the world holds both.
        plans += [ParallelPlan(vision=ComponentPlan(sharding=s), projector=ComponentPlan(sharding=s),
                               language=ComponentPlan(sharding=s), tp=tp) for s in shardings]
        plans += [ParallelPlan(dp_replicate=replicas, tp=degree) for replicas, degree in layouts if replicas > 1]
        # Explicit prefetch off, and deeper than the default (across component boundaries).
        plans += [ParallelPlan(prefetch=0), ParallelPlan(prefetch=3, tp=tp)]
        for plan in plans:
            training = _train_sharded(plan, meshes[plan.dp_replicate, plan.tp])
            state = _full_state(training.model)
            if rank == 0:
                what = (f"world {world_size} dp_replicate {plan.dp_replicate} tp {plan.tp} prefetch {plan.prefetch} "
                        f"{[plan.component(n).sharding for n in ('vision', 'projector', 'language')]}")
                _assert_trains_as_one_process(state, training, _single_process_reference(world_size // plan.tp), what)
        # Checkpoints: world 2 saves one without and one with tensor parallelism; world 4 loads them into other
        # layouts (resharding data-parallel and tensor-parallel dims) and must hold the same weights.
        checkpoints = {1: os.path.join(checkpoint_dir, "dp"), tp: os.path.join(checkpoint_dir, "tp")}
        for saved_tp, load_plan in ((1, ParallelPlan(tp=tp)), (tp, ParallelPlan())):
            if world_size == 2:
                training = _train_sharded(ParallelPlan(tp=saved_tp), meshes[1, saved_tp])
                save_sharded(checkpoints[saved_tp], training.model, training.optimizer)
            else:
                torch.manual_seed(1)
                fresh = ThreeComponents()
                parallelize(fresh, load_plan, mesh=meshes[1, load_plan.tp])
                load_sharded(checkpoints[saved_tp], fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
                state = _full_state(fresh)
                if rank == 0:
                    _assert_states_close(state, _single_process_reference(2 // saved_tp).model.state_dict(), f"tp {saved_tp} loaded at world 4")
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
    checkpoints = str(tmp_path / "checkpoints")
    _spawn(2, checkpoints)
    for name in ("dp", "tp"):
        assert os.path.isdir(os.path.join(checkpoints, name)) and not os.path.exists(os.path.join(checkpoints, name + ".tmp"))
    _spawn(4, checkpoints)


def _compiled_worker(rank: int, world_size: int, init_file: str, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        torch.set_num_threads(1)
        for tp in (1, 2):
            blocks = ComponentPlan(sharding="zero3", activation_checkpointing=True, compile=True)
            plan = ParallelPlan(vision=blocks, projector=ComponentPlan(sharding="replicate", compile=True), language=blocks, tp=tp)
            training = _train_sharded(plan, build_meshes(plan, "cpu"))
            state = _full_state(training.model)
            if rank == 0:
                _assert_trains_as_one_process(state, training, _single_process_reference(world_size // tp), f"compiled, checkpointed, tp {tp}")
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_compiled_and_checkpointed_blocks_train_like_a_single_process(tmp_path):
    """ComponentPlan(compile=True, activation_checkpointing=True): torch.compile (inductor) and activation
    checkpointing per block under FSDP2, with and without tensor parallelism, at world 2."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(_compiled_worker, args=(2, str(tmp_path / "init"), errors), nprocs=2, join=True, start_method="spawn")
    if not errors.empty():
        pytest.fail(errors.get())


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
        (dict(tp=0), ValueError, "tp must be an int >= 1"),
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


def test_checkpoint_blocks_recomputes_in_backward_and_keeps_names():
    """checkpoint_blocks: the same gradients, each block's forward run again in backward, parameter and
    state_dict names unchanged; applying it twice wraps once."""
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed)
    checkpoint_blocks(checkpointed)
    x = torch.randn(4, 8, requires_grad=True)
    plain(x).square().sum().backward()
    expected = [p.grad for p in plain.parameters()]
    checkpointed(x.detach().requires_grad_()).square().sum().backward()
    for actual, grad in zip((p.grad for p in checkpointed.parameters()), expected):
        torch.testing.assert_close(actual, grad)
    assert [name for name, _ in checkpointed.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()


def test_checkpoint_blocks_runs_the_forward_again_in_backward():
    block = nn.Linear(4, 4)
    runs = []
    original = block.forward
    block.forward = lambda x: (runs.append(1), original(x))[1]
    checkpoint_blocks(nn.ModuleList([block]))
    block(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert len(runs) == 2


def test_plans_round_trip_through_plain_data():
    """to_dict gives a plan file's contents (JSON/YAML-ready: dtypes by name, None kept); from_dict gives the
    plan back, with left-out fields at their defaults."""
    import json

    plans = [
        ParallelPlan(),
        ParallelPlan(vision=ComponentPlan("replicate", param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          activation_checkpointing=True, compile=True),
                     language=ComponentPlan("zero2", param_dtype=torch.float16), dp_replicate=2, tp=4, prefetch=0),
    ]
    for plan in plans:
        data = plan.to_dict()
        assert json.loads(json.dumps(data)) == data
        assert ParallelPlan.from_dict(json.loads(json.dumps(data))) == plan
    assert plans[1].to_dict()["vision"]["param_dtype"] == "bfloat16" and plans[0].to_dict()["vision"]["param_dtype"] is None
    assert ParallelPlan.from_dict({"tp": 2, "language": {"param_dtype": "bf16"}}) == ParallelPlan(
        tp=2, language=ComponentPlan(param_dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "data,error,match",
    [
        ([1], TypeError, "a plan is a mapping"),
        ({"pp": 2}, ValueError, r"unknown plan fields \['pp'\]"),
        ({"vision": "zero2"}, TypeError, "vision must be a mapping"),
        ({"language": {"shard": "zero3"}}, ValueError, r"language: unknown ComponentPlan fields \['shard'\]"),
        ({"language": {"param_dtype": "int8"}}, ValueError, "language.param_dtype must be one of"),
        ({"tp": 0}, ValueError, "tp must be an int >= 1"),
    ],
)
def test_bad_plan_data(data, error, match):
    with pytest.raises(error, match=match):
        ParallelPlan.from_dict(data)


def test_tensor_parallel_needs_qwen2_blocks_and_whole_heads():
    decoder = Decoder(2)
    check_tensor_parallel(decoder.layers, 2)
    with pytest.raises(ValueError, match=r"tp = 4 must divide the head count of self_attn.k_proj \(2 heads"):
        check_tensor_parallel(decoder.layers, 4)
    with pytest.raises(ValueError, match="tp = 3 must divide the output features of self_attn.q_proj"):
        check_tensor_parallel(decoder.layers, 3)
    with pytest.raises(ValueError, match="Qwen2-style LLM blocks with an nn.Linear 'self_attn.q_proj'"):
        check_tensor_parallel(Stack(WIDTH, WIDTH, 2).layers, 2)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    ours, theirs = Decoder(2), Decoder(2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, WIDTH)
    for model in (ours, theirs):
        model(x).square().sum().backward()
    norm = clip_grad_norm_(ours.parameters(), MAX_NORM)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), MAX_NORM)
    torch.testing.assert_close(norm, expected)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm_(ours.parameters(), 0.0)


def test_bfloat16_parameters_keep_the_llms_positions_and_loss_weights_in_float32(monkeypatch):
    """Under a plan whose components compute in bfloat16 (the planner's), the vision tower's pixels are cast
    to bfloat16 but the LLM's V2PE positions and loss weights reach its kernels in float32 (FSDP2 casts a
    unit's floating inputs to param_dtype unless told not to)."""
    import internvl3_engine as engine
    from model import InternVL3, InternVL3Config
    from model.data import ByteTokenizer

    seen = {}
    attention, cross_entropy = engine.v2pe_attention, engine.linear_cross_entropy

    def recording_attention(q, k, v, cu_seqlens, max_seqlen, positions, **kwargs):
        if positions is not None:  # the LLM's (the ViT's attention has none)
            seen["q"], seen["positions"] = q.dtype, positions.dtype
        return attention(q, k, v, cu_seqlens, max_seqlen, positions, **kwargs)

    def recording_cross_entropy(hidden, weight, labels, loss_weights=None, **kwargs):
        seen["loss_weights"] = loss_weights.dtype
        return cross_entropy(hidden, weight, labels, loss_weights=loss_weights, **kwargs)

    monkeypatch.setattr(engine, "v2pe_attention", recording_attention)
    monkeypatch.setattr(engine, "linear_cross_entropy", recording_cross_entropy)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = InternVL3Config.preset("tiny")
        model = InternVL3(config, init_seed=0)
        bf16 = ComponentPlan(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        parallelize(model, ParallelPlan(vision=bf16, projector=bf16, language=bf16))
        image = ByteTokenizer().img_context_id
        tokens = config.tokens_per_tile
        input_ids = torch.tensor([5, 6] + [image] * tokens + [7, 8, 9])
        positions = torch.arange(input_ids.shape[0], dtype=torch.float32) * 0.5
        labels = torch.roll(input_ids, -1)
        output = model(input_ids, torch.randn(1, 3, config.vision.image_size, config.vision.image_size),
                       torch.tensor([0, input_ids.shape[0]], dtype=torch.int32), positions, labels,
                       torch.full((input_ids.shape[0],), 0.25), input_ids.shape[0])
        output.loss.backward()
    finally:
        dist.destroy_process_group()
    assert seen == {"q": torch.bfloat16, "positions": torch.float32, "loss_weights": torch.float32}
    assert torch.isfinite(output.loss)
