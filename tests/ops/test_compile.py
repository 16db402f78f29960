"""All ops in one block under torch.compile(fullgraph=True) with the default (inductor) backend:
no graph breaks, same values and gradients as eager."""

import torch

import internvl3_engine as ie


def _block(features, weight, bias, text_embeds, queries, is_visual, cu_seqlens, labels):
    positions = ie.v2pe_position_ids(is_visual, cu_seqlens, 0.5)
    visual = ie.pixel_unshuffle_layernorm(features, weight, bias).flatten(0, 1)
    embeds = ie.scatter_visual(text_embeds, visual, is_visual)
    rotated = ie.apply_rotary(queries + embeds[:, None, :], positions)
    weights = ie.loss_weights(labels, cu_seqlens)
    return (rotated.sum(dim=(1, 2)) * weights).sum()


def test_all_ops_fullgraph_inductor():
    tiles, grid, width = 2, 4, 4
    visual_tokens = tiles * (grid // 2) ** 2
    is_visual = torch.tensor([False] * 3 + [True] * visual_tokens + [False] * 4 + [False] * 6)
    cu_seqlens = ie.cu_seqlens_from_lengths([3 + visual_tokens + 4, 6])
    total = is_visual.shape[0]
    inputs = dict(
        features=torch.randn(tiles, grid, grid, width, requires_grad=True),
        weight=torch.randn(4 * width, requires_grad=True),
        bias=torch.randn(4 * width, requires_grad=True),
        text_embeds=torch.randn(total, 4 * width, requires_grad=True),
        queries=torch.randn(total, 2, 4 * width, requires_grad=True),
    )
    labels = torch.randint(0, 100, (total,))
    labels[is_visual] = -100
    eager = _block(**inputs, is_visual=is_visual, cu_seqlens=cu_seqlens, labels=labels)
    eager_grads = torch.autograd.grad(eager, list(inputs.values()))
    compiled = torch.compile(_block, fullgraph=True)(**inputs, is_visual=is_visual, cu_seqlens=cu_seqlens, labels=labels)
    compiled_grads = torch.autograd.grad(compiled, list(inputs.values()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
