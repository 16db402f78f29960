"""The reference model under context parallelism: a pack with images, V2PE positions (per-image deltas),
several samples (one of a single token) and square-averaged loss weights, split over cp gloo ranks by
``context_parallel_group``, gives the single process's loss and every parameter's gradient (summed over the
ranks; sharded by FSDP2 over the cp ranks under ParallelPlan(cp=cp), as the trainer runs it, the gathered
gradients), at cp 2 and 4 (GQA key-value heads split, then repeated); a pack shorter than cp trains too;
the elements each rank sends are the planner's context_parallel_bytes formula's."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import internvl3_engine as engine
from model import InternVL3, InternVL3Config

IMAGE_TOKEN = 261  # the tiny preset's <IMG_CONTEXT>


def _pack(config):
    """Samples of 9, 1, 14 and 6 tokens; the first and third hold an image of 1 and 2 tiles."""
    generator = torch.Generator().manual_seed(3)
    per_tile = config.tokens_per_tile

    def text(n):
        return torch.randint(0, 256, (n,), generator=generator)

    image = torch.full((per_tile,), IMAGE_TOKEN)
    samples = [torch.cat([text(2), image, text(3)]), text(1), torch.cat([text(1), image, image, text(5)]), text(6)]
    input_ids = torch.cat(samples)
    lengths = [len(sample) for sample in samples]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    is_visual = input_ids == IMAGE_TOKEN
    positions = engine.v2pe_position_ids(is_visual, cu_seqlens, torch.tensor([0.25, 0.5]))
    labels = torch.roll(input_ids, -1).masked_fill(is_visual, -100)
    labels[cu_seqlens[1:].long() - 1] = -100
    weights = engine.loss_weights(labels, cu_seqlens, mode="square")
    pixels = torch.randn(3, 3, config.vision.image_size, config.vision.image_size, generator=generator)
    return dict(input_ids=input_ids, pixel_values=pixels, cu_seqlens=cu_seqlens, positions=positions, labels=labels,
                loss_weights=weights, max_seqlen=max(lengths))


def _traffic_pack(config):
    """32 tokens in samples of 12, 10 and 10, with 2 images of 2 tiles: no padding at cp 2 and 4."""
    generator = torch.Generator().manual_seed(5)
    image = torch.full((2 * config.tokens_per_tile,), IMAGE_TOKEN)
    input_ids = torch.cat([torch.randint(0, 256, (2,), generator=generator), image, torch.randint(0, 256, (13,), generator=generator),
                           image, torch.randint(0, 256, (1,), generator=generator)])
    cu_seqlens = torch.tensor([0, 12, 22, 32], dtype=torch.int32)
    pixels = torch.randn(4, 3, config.vision.image_size, config.vision.image_size, generator=generator)
    return dict(input_ids=input_ids, pixel_values=pixels, cu_seqlens=cu_seqlens, labels=torch.roll(input_ids, -1), max_seqlen=12)


def _measured_traffic(model, pack, group, cp: int) -> int:
    """Elements this rank sent in its all-to-alls and gathers during a forward and backward under cp."""
    from internvl3_engine.parallel import context as context_module

    sent = [0]
    all_to_all, all_gather = context_module._all_to_all, dist.all_gather

    def counting_all_to_all(chunks, group):
        sent[0] += chunks.numel() * (cp - 1) // cp
        return all_to_all(chunks, group)

    def counting_all_gather(pieces, tensor, group=None):
        sent[0] += tensor.numel() * (cp - 1)
        return all_gather(pieces, tensor, group=group)

    context_module._all_to_all, dist.all_gather = counting_all_to_all, counting_all_gather
    try:
        model(**pack, context_parallel_group=group).loss.backward()
    finally:
        context_module._all_to_all, dist.all_gather = all_to_all, all_gather
    return sent[0]


def _loss_and_grads(model, pack, **kwargs):
    loss = model(**pack, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _sharded_loss_and_grads(config, pack, cp: int):
    """The trainer's context-parallel step on one pack: the model sharded by FSDP2 over the cp ranks
    (ParallelPlan(cp=cp)), this rank's sum(w * CE) through data_parallel_loss with its share of sum(w) (FSDP2
    averages the ranks' gradients). Returns the loss (the mean of the ranks' terms) and the gathered gradients."""
    from torch.distributed.tensor import DTensor

    from internvl3_engine.parallel import ContextShard, ParallelPlan, data_parallel_loss, parallelize

    model = InternVL3(config, init_seed=0)
    state = parallelize(model, ParallelPlan(cp=cp))
    output = model(**pack, loss_normalizer=1.0, context_parallel_group=state.cp_group)
    weights = ContextShard.of(pack["input_ids"].shape[0], dist.get_rank(state.cp_group), cp).local(pack["loss_weights"], 0.0)
    term = data_parallel_loss(output.loss, weights.sum())
    term.backward()
    loss = term.detach()
    dist.all_reduce(loss)
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for name, p in model.named_parameters() if p.grad is not None}
    return loss / cp, grads


def _assert_grads_close(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def _worker(rank: int, cp: int, init_file: str, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
        config = InternVL3Config.preset("tiny")
        single_loss, single_grads = _loss_and_grads(InternVL3(config, init_seed=0), _pack(config))
        loss, grads = _loss_and_grads(InternVL3(config, init_seed=0), _pack(config), context_parallel_group=dist.group.WORLD)
        dist.all_reduce(loss)
        torch.testing.assert_close(loss, single_loss, rtol=1e-5, atol=0)
        for grad in grads.values():
            dist.all_reduce(grad)
        _assert_grads_close(grads, single_grads)
        loss, grads = _sharded_loss_and_grads(config, _pack(config), cp)
        torch.testing.assert_close(loss, single_loss, rtol=1e-5, atol=0)
        _assert_grads_close(grads, single_grads)
        # The communication per rank is the planner's formula (in elements: the formula counts bf16 bytes).
        from internvl3_engine.parallel import ParallelPlan
        from internvl3_engine.planner import ModelShape, Workload
        from internvl3_engine.planner.cost import ACTIVATION_BYTES, context_parallel_bytes

        model = InternVL3(config, init_seed=0)
        sent = _measured_traffic(model, _traffic_pack(config), dist.group.WORLD, cp)
        shape = ModelShape.from_modules(config.to_hf(), model)
        # The backward of the rows' gather is a reduce-scatter, counted by the formula; on gloo it is an all-reduce.
        expected = context_parallel_bytes(shape, ParallelPlan(cp=cp), Workload(tokens_per_pack=32, tiles_per_pack=4))
        rows = 4 * config.tokens_per_tile * config.text.hidden_size
        assert sent + rows * (cp - 1) // cp == expected / ACTIVATION_BYTES, (sent, expected)
        # A pack shorter than the degree: the padding fills the other ranks' shares, and it still trains.
        short = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([6, 7, -100]), "max_seqlen": 3,
                 "cu_seqlens": torch.tensor([0, 3], dtype=torch.int32)}
        single_loss, _ = _loss_and_grads(InternVL3(config, init_seed=0), short)
        loss, _ = _loss_and_grads(InternVL3(config, init_seed=0), short, context_parallel_group=dist.group.WORLD)
        dist.all_reduce(loss)
        torch.testing.assert_close(loss, single_loss, rtol=1e-5, atol=0)
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("cp", [2, 4])
def test_a_pack_split_over_cp_ranks_trains_as_one_process(cp):
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.start_processes(_worker, args=(cp, os.path.join(folder, "init"), errors), nprocs=cp, join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            messages = []
            while not errors.empty():
                messages.append(errors.get())
            pytest.fail("\n".join(messages))
