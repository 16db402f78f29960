"""Context parallelism's attention: a pack split over cp gloo ranks (ContextShard) through Ulysses
all-to-all attention gives the single process's output and q, k, v gradients, with V2PE positions, GQA
(key-value heads split or repeated), samples of one token and a pack that needs padding."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from internvl3_engine import v2pe_attention
from internvl3_engine.parallel.context import ContextShard, check_context_parallel_heads, ulysses_attention

LENGTHS = [5, 1, 9, 2, 1, 4]  # 22 tokens: padded to 24 at cp 4
HEAD_DIM = 16


def _pack(heads: int, kv_heads: int):
    generator = torch.Generator().manual_seed(7)
    tokens = sum(LENGTHS)
    q = torch.randn(tokens, heads, HEAD_DIM, generator=generator)
    k = torch.randn(tokens, kv_heads, HEAD_DIM, generator=generator)
    v = torch.randn(tokens, kv_heads, HEAD_DIM, generator=generator)
    grad = torch.randn(tokens, heads, HEAD_DIM, generator=generator)
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    # V2PE-like positions: restarting per sample, with fractional steps.
    positions = torch.cat([torch.arange(length, dtype=torch.float32) * (0.25 if index % 2 else 1.0)
                           for index, length in enumerate(LENGTHS)])
    return q, k, v, grad, cu_seqlens, positions


def _single(heads: int, kv_heads: int):
    q, k, v, grad, cu_seqlens, positions = _pack(heads, kv_heads)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = v2pe_attention(q, k, v, cu_seqlens, max(LENGTHS), positions, causal=True)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank: int, cp: int, heads: int, kv_heads: int, init_file: str, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
        q, k, v, grad, cu_seqlens, positions = _pack(heads, kv_heads)
        shard = ContextShard.of(q.shape[0], rank, cp)
        local = [shard.local(x).clone().requires_grad_() for x in (q, k, v)]
        out = ulysses_attention(*local, shard.padded_cu_seqlens(cu_seqlens), max(LENGTHS), shard.pad(positions, 0.0),
                                dist.group.WORLD, causal=True)
        out.backward(shard.local(grad))
        gathered = []
        for tensor in (out.detach(), *(x.grad for x in local)):
            pieces = [torch.empty_like(tensor) for _ in range(cp)]
            dist.all_gather(pieces, tensor.contiguous())
            gathered.append(torch.cat(pieces)[: shard.total])
        expected = _single(heads, kv_heads)
        for name, got, want in zip(("out", "dq", "dk", "dv"), gathered, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("cp, heads, kv_heads", [(2, 4, 2), (4, 4, 2), (4, 8, 4), (2, 6, 1)])
def test_ulysses_attention_over_cp_ranks_equals_one_process(cp, heads, kv_heads):
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.start_processes(_worker, args=(cp, heads, kv_heads, os.path.join(folder, "init"), errors), nprocs=cp,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            messages = []
            while not errors.empty():
                messages.append(errors.get())
            pytest.fail("\n".join(messages))


def test_context_shard_splits_and_pads():
    shards = [ContextShard.of(22, rank, 4) for rank in range(4)]
    assert [(s.start, s.stop) for s in shards] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    values = torch.arange(22)
    assert torch.equal(torch.cat([s.local(values, -1) for s in shards])[:22], values)
    assert shards[3].local(values, -1)[-2:].tolist() == [-1, -1]
    cu = torch.tensor([0, 10, 22], dtype=torch.int32)
    assert shards[0].padded_cu_seqlens(cu).tolist() == [0, 10, 22, 24]
    whole = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert ContextShard.of(8, 0, 4).padded_cu_seqlens(whole) is whole
    with pytest.raises(ValueError, match="rank"):
        ContextShard.of(8, 4, 4)
    with pytest.raises(ValueError, match="at least one token"):
        ContextShard.of(0, 0, 2)


@pytest.mark.parametrize("cp, heads, kv_heads, ok", [(2, 28, 4, True), (4, 28, 4, True), (8, 28, 4, False), (7, 28, 4, False),
                                                     (14, 14, 2, True), (7, 14, 2, False), (3, 6, 2, False)])
def test_the_head_counts_bound_the_degree(cp, heads, kv_heads, ok):
    if ok:
        check_context_parallel_heads(cp, heads, kv_heads)
    else:
        with pytest.raises(ValueError, match="context parallel degree"):
            check_context_parallel_heads(cp, heads, kv_heads)
