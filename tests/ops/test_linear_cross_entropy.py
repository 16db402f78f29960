import pytest
import torch
import torch.nn.functional as F

import internvl3_engine as ie
from internvl3_engine.ops.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy_backward_reference,
    linear_cross_entropy_reference,
)

from helpers import SLACK, assert_fa_close, backends_for, devices, dtypes_for, max_error

CASES = [  # tokens, hidden size, vocabulary, logits scale
    (1, 16, 37, 2.0),
    (37, 32, 600, 2.0),  # vocabulary not a multiple of the block size
    (50, 64, 257, 2.0),
    (23, 16, 300, 40.0),  # large logits: the online max must keep exp() in range
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the Triton kernels' vocabulary block so that rows span several blocks, the last partial."""
    from internvl3_engine.ops.linear_cross_entropy import triton_kernel

    monkeypatch.setattr(triton_kernel, "BLOCK_V", 128)


def _inputs(tokens, hidden_size, vocab, scale, dtype, device, *, bias=True, ignored=0.3, ignore_index=-100):
    hidden = torch.randn(tokens, hidden_size, device=device)
    weight = torch.randn(vocab, hidden_size, device=device) * (scale / hidden_size**0.5)
    bias_ = torch.randn(vocab, device=device) if bias else None
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < ignored] = ignore_index
    as_dtype = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return as_dtype(hidden), as_dtype(weight), as_dtype(bias_), labels


def _square_weights(labels, ignore_index=-100):
    """InternVL3's square weights for the pack split into three samples."""
    tokens = labels.shape[0]
    cuts = sorted({0, tokens // 3, (2 * tokens) // 3, tokens})
    return ie.loss_weights(labels, torch.tensor(cuts, dtype=torch.int32, device=labels.device), "square", ignore_index)


def _loss_and_grads(kind, hidden, weight, bias, labels, upstream=None, **kwargs):
    """The loss through the public API on backend ``kind``, and the gradients of hidden, weight, bias."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    # The backward runs inside the block too: it picks its backend when it runs.
    with ie.backend(kind):
        loss = ie.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None, **kwargs)
        grads = torch.autograd.grad(loss, leaves, upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), grads


def _double(tensors):
    return [None if t is None else t.double() for t in tensors]


def _assert_loss_close(loss, gold, baseline, what):
    """assert_fa_close for a loss; a 0-d loss also gets 4 ulps of its value as slack: its error is a
    single sample of the rounding (a sum of per-token errors), too noisy for the 2x rule alone."""
    if loss.dim() > 0:
        assert_fa_close(loss, gold, baseline, what=what)
        return
    error = max_error(loss, gold)
    allowed = 2.0 * max_error(baseline, gold) + SLACK[loss.dtype] + 4 * torch.finfo(loss.dtype).eps * abs(gold.item())
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g}"


def _check_against_float64(kind, dtype, hidden, weight, bias, labels, what, upstream=None, **kwargs):
    # A random upstream gradient by default (a scalar one for 'sum' and 'mean'): gradients computed in the
    # forward are scaled by it in the backward.
    if upstream is None:
        shape = (labels.shape[0],) if kwargs.get("reduction") == "none" else ()
        upstream = torch.randn(shape, device=labels.device)
    loss, grads = _loss_and_grads(kind, hidden, weight, bias, labels, upstream, **kwargs)
    gold_loss, gold_grads = _loss_and_grads("torch", *_double((hidden, weight, bias)), labels, upstream.double(), **kwargs)
    base_loss, base_grads = _loss_and_grads("torch", hidden, weight, bias, labels, upstream, **kwargs)
    assert loss.dtype == torch.float32
    _assert_loss_close(loss, gold_loss, base_loss, what=f"{what} loss")
    for name, grad, gold, base in zip(("hidden", "weight", "bias"), grads, gold_grads, base_grads):
        assert grad.dtype == dtype
        assert_fa_close(grad, gold, base, factor=3.0, what=f"{what} grad {name}")
    return loss, grads


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("tokens,hidden_size,vocab,scale", CASES)
@pytest.mark.parametrize(
    "reduction,precompute_grads", [("none", True), ("sum", True), ("mean", True), ("sum", False), ("mean", False)]
)
def test_against_float64(device, tokens, hidden_size, vocab, scale, reduction, precompute_grads, small_blocks):
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            # With a bias and square loss weights, and without either.
            for bias in (True, False):
                hidden, weight, bias_, labels = _inputs(tokens, hidden_size, vocab, scale, dtype, device, bias=bias)
                loss_weights = _square_weights(labels) if bias else None
                _check_against_float64(
                    kind, dtype, hidden, weight, bias_, labels, f"{kind} {dtype} bias={bias}",
                    reduction=reduction, loss_weights=loss_weights, chunk_size=7, precompute_grads=precompute_grads,
                )


@pytest.mark.parametrize("device", devices(), ids=str)
def test_chunk_sizes_agree(device, small_blocks):
    tokens = 29
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            hidden, weight, bias, labels = _inputs(tokens, 32, 333, 3.0, dtype, device)
            results = {}
            upstream = torch.randn((), device=device)
            for chunk_size in (1, 7, tokens + 5):
                results[chunk_size] = _check_against_float64(
                    kind, dtype, hidden, weight, bias, labels, f"{kind} {dtype} chunk {chunk_size}", upstream,
                    chunk_size=chunk_size,
                )
            if dtype == torch.float32:
                loss, grads = results[1]
                for other_loss, other_grads in results.values():
                    torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
                    for grad, other in zip(grads, other_grads):
                        torch.testing.assert_close(other, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_ignored_tokens_weigh_nothing(device, ignore_index, small_blocks):
    hidden, weight, bias, labels = _inputs(40, 16, 200, 2.0, torch.float32, device, ignored=0.4, ignore_index=ignore_index)
    ignored = labels == ignore_index
    loss_weights = torch.rand(40, device=device) + 0.5  # nonzero on the ignored tokens too: they must still weigh 0
    for kind in backends_for(device):
        ce, (grad_hidden, _, _) = _loss_and_grads(kind, hidden, weight, bias, labels, torch.randn(40, device=device), reduction="none", ignore_index=ignore_index)
        assert torch.equal(ce[ignored], torch.zeros_like(ce[ignored]))
        assert (ce[~ignored] > 0).all()
        assert torch.equal(grad_hidden[ignored], torch.zeros_like(grad_hidden[ignored]))
        with ie.backend(kind):
            weighted = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, loss_weights=loss_weights, reduction="none")
            total = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, loss_weights=loss_weights, reduction="sum")
            mean = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, loss_weights=loss_weights)
        torch.testing.assert_close(weighted, loss_weights * ce)
        torch.testing.assert_close(total, weighted.sum())
        torch.testing.assert_close(mean, weighted.sum() / loss_weights[~ignored].sum())


@pytest.mark.parametrize("device", devices(), ids=str)
def test_all_tokens_ignored_gives_zero_not_nan(device):
    hidden, weight, bias, labels = _inputs(9, 16, 50, 2.0, torch.float32, device, ignored=1.0)
    for kind in backends_for(device):
        for kwargs in (dict(), dict(loss_weights=torch.ones(9, device=device)), dict(normalizer=torch.tensor(0.0, device=device))):
            loss, grads = _loss_and_grads(kind, hidden, weight, bias, labels, **kwargs)
            assert loss.item() == 0.0, (kind, kwargs)
            for grad in grads:
                assert torch.equal(grad, torch.zeros_like(grad)), (kind, kwargs)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_empty_pack(device):
    hidden, weight, bias, labels = _inputs(0, 16, 50, 2.0, torch.float32, device)
    for kind in backends_for(device):
        loss, grads = _loss_and_grads(kind, hidden, weight, bias, labels)
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        with ie.backend(kind):
            assert ie.linear_cross_entropy(hidden, weight, labels, reduction="none").shape == (0,)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_given_normalizer_replaces_sum_of_weights(device):
    hidden, weight, bias, labels = _inputs(30, 16, 120, 2.0, torch.float32, device)
    loss_weights = _square_weights(labels)
    for kind in backends_for(device):
        with ie.backend(kind):
            total = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, loss_weights=loss_weights, reduction="sum")
            default = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, loss_weights=loss_weights)
            # Data parallel: sum(w) all-reduced over ranks, here as if this rank held a third of the weight.
            global_weight = 3 * loss_weights.sum()
            given = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, loss_weights=loss_weights, normalizer=global_weight)
            given_float = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, loss_weights=loss_weights, normalizer=global_weight.item())
        torch.testing.assert_close(default, total / loss_weights.sum())
        torch.testing.assert_close(given, total / global_weight)
        torch.testing.assert_close(given_float, given)


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch_cross_entropy(device, dtype):
    """With loss_weights None the mean is torch's cross_entropy over the supervised tokens."""
    hidden, weight, bias, labels = _inputs(33, 24, 150, 3.0, dtype, device)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    expected = F.cross_entropy(F.linear(*leaves), labels, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, leaves)
    for kind in backends_for(device):
        with ie.backend(kind):
            loss = ie.linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=8)
            grads = torch.autograd.grad(loss, leaves)
        torch.testing.assert_close(loss, expected)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad)


def test_reference_backward_is_the_gradient_of_the_reference():
    hidden, weight, bias, labels = _inputs(20, 12, 90, 2.0, torch.float64, torch.device("cpu"))
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    ce, lse = linear_cross_entropy_reference(*leaves, labels, -100, 1)
    grad_ce = torch.randn(20, dtype=torch.float64)
    expected = torch.autograd.grad(ce, leaves, grad_ce)
    computed = linear_cross_entropy_backward_reference(grad_ce, *(t.detach() for t in leaves), labels, lse.detach(), -100, 1)
    for grad, expected_grad in zip(computed, expected):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_int32_labels_and_noncontiguous_inputs(device):
    hidden, weight, bias, labels = _inputs(17, 16, 100, 2.0, torch.float32, device)
    strided_hidden = hidden.t().contiguous().t()
    strided_weight = weight.t().contiguous().t()
    assert not strided_hidden.is_contiguous() and not strided_weight.is_contiguous()
    for kind in backends_for(device):
        with ie.backend(kind):
            expected = ie.linear_cross_entropy(hidden, weight, labels, bias=bias)
            torch.testing.assert_close(ie.linear_cross_entropy(hidden, weight, labels.int(), bias=bias), expected)
            torch.testing.assert_close(ie.linear_cross_entropy(strided_hidden, strided_weight, labels, bias=bias), expected)


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("bad_label", [-1, 100])
def test_label_out_of_range_raises(device, bad_label):
    hidden, weight, bias, labels = _inputs(8, 16, 100, 2.0, torch.float32, device)
    labels[5] = bad_label
    for kind in backends_for(device):
        with ie.backend(kind), pytest.raises(ValueError, match=rf"labels must be in \[0, 100\).*got {bad_label} at token 5"):
            ie.linear_cross_entropy(hidden, weight, labels)


def test_opcheck():
    hidden, weight, bias, labels = _inputs(6, 8, 20, 2.0, torch.float32, torch.device("cpu"))
    forward = torch.ops.internvl3_engine.linear_cross_entropy.default
    backward = torch.ops.internvl3_engine.linear_cross_entropy_backward.default
    with_grads = torch.ops.internvl3_engine.linear_cross_entropy_with_grads.default
    torch.library.opcheck(forward, (hidden, weight, bias, labels, -100, 4))
    torch.library.opcheck(forward, (hidden, weight, None, labels, -100, 4))
    _, lse = forward(hidden, weight, bias, labels, -100, 4)
    grad_ce = torch.randn(6)
    for bias_ in (bias, None):
        for wanted in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(backward, (grad_ce, hidden, weight, bias_, labels, lse, -100, 4, *wanted))
            torch.library.opcheck(with_grads, (hidden, weight, bias_, labels, grad_ce, -100, 4, *wanted))


@pytest.mark.parametrize("precompute_grads", [True, False])
def test_torch_compile_fullgraph(precompute_grads):
    def loss_fn(hidden, weight, labels, loss_weights, normalizer):
        return ie.linear_cross_entropy(
            hidden * 2, weight, labels, loss_weights=loss_weights, normalizer=normalizer, precompute_grads=precompute_grads
        )

    hidden, weight, _, labels = _inputs(12, 16, 40, 2.0, torch.float32, torch.device("cpu"))
    loss_weights = _square_weights(labels)
    normalizer = loss_weights.sum()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    expected = loss_fn(hidden, weight, labels, loss_weights, normalizer)
    actual = compiled(hidden, weight, labels, loss_weights, normalizer)
    torch.testing.assert_close(actual, expected)
    for grad, expected_grad in zip(torch.autograd.grad(actual, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(grad, expected_grad)


@pytest.fixture
def logits_passes(monkeypatch):
    """Counts the chunks whose logits the Triton backend computes."""
    from internvl3_engine.ops.linear_cross_entropy import triton_kernel

    count = [0]
    chunks = triton_kernel._logits_chunks

    def counted(*args):
        for chunk in chunks(*args):
            count[0] += 1
            yield chunk

    monkeypatch.setattr(triton_kernel, "_logits_chunks", counted)
    return count


@pytest.mark.parametrize("device", devices(), ids=str)
def test_precomputed_gradients_take_one_pass(device, logits_passes):
    """With precompute_grads the logits of each chunk are computed once for loss and gradients, twice
    without; without autograd (no_grad, or no input requiring grad) only the loss is computed."""
    if "triton" not in backends_for(device):
        pytest.skip("the Triton backend cannot run here")
    hidden, weight, _, labels = _inputs(20, 16, 90, 2.0, torch.float32, device)
    chunks = 3  # 20 tokens in chunks of 7
    expected = {}
    for precompute_grads, passes in ((True, chunks), (False, 2 * chunks)):
        logits_passes[0] = 0
        loss, grads = _loss_and_grads("triton", hidden, weight, None, labels, chunk_size=7, precompute_grads=precompute_grads)
        assert logits_passes[0] == passes, precompute_grads
        expected[precompute_grads] = (loss, grads)
    torch.testing.assert_close(expected[True], expected[False], rtol=1e-5, atol=1e-6)
    for context in (torch.no_grad(), torch.enable_grad()):
        logits_passes[0] = 0
        with context, ie.backend("triton"):
            torch.testing.assert_close(ie.linear_cross_entropy(hidden, weight, labels, chunk_size=7), expected[True][0])
        assert logits_passes[0] == chunks


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("precompute_grads", [True, False])
def test_frozen_inputs_get_no_gradient(device, precompute_grads):
    """A frozen head (the LLM frozen while the projector trains) or frozen hidden states: only the
    gradients autograd asks for are returned, and they equal those of the unfrozen call."""
    hidden, weight, bias, labels = _inputs(15, 16, 70, 2.0, torch.float32, device)
    for kind in backends_for(device):
        with ie.backend(kind):
            leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
            loss = ie.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=4, precompute_grads=precompute_grads)
            all_grads = torch.autograd.grad(loss, leaves)
            for trained in ((0,), (1, 2), (1,)):
                inputs = [t.detach().requires_grad_(i in trained) for i, t in enumerate((hidden, weight, bias))]
                loss = ie.linear_cross_entropy(*inputs[:2], labels, bias=inputs[2], chunk_size=4, precompute_grads=precompute_grads)
                loss.backward()
                for i, t in enumerate(inputs):
                    if i in trained:
                        torch.testing.assert_close(t.grad, all_grads[i])
                    else:
                        assert t.grad is None, (kind, trained, i)


def test_gradient_ops_skip_unwanted_gradients():
    hidden, weight, bias, labels = _inputs(9, 8, 30, 2.0, torch.float32, torch.device("cpu"))
    grad_ce = torch.randn(9)
    ops = torch.ops.internvl3_engine
    _, lse = ops.linear_cross_entropy(hidden, weight, bias, labels, -100, 4)
    for kind in backends_for(torch.device("cpu")):
        with ie.backend(kind):
            recomputed = ops.linear_cross_entropy_backward(grad_ce, hidden, weight, bias, labels, lse, -100, 4, False, True)
            _, *precomputed = ops.linear_cross_entropy_with_grads(hidden, weight, bias, labels, grad_ce, -100, 4, True, False)
        assert recomputed[0].numel() == 0 and recomputed[1].shape == weight.shape and recomputed[2].shape == bias.shape
        assert precomputed[0].shape == hidden.shape and precomputed[1].numel() == 0 and precomputed[2].numel() == 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(hidden=torch.randn(4, 8, 1)), ValueError, "hidden must be 2-D"),
        (dict(hidden=torch.randint(0, 3, (4, 8))), TypeError, "hidden must have dtype"),
        (dict(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
        (dict(weight=torch.randn(20)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(20, 7)), ValueError, "weight must have the hidden size of hidden"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight must have at least one row"),
        (dict(weight=torch.randn(20, 8, device="meta")), ValueError, "weight must be on cpu"),
        (dict(bias=torch.randn(19)), ValueError, "bias must have 20 rows"),
        (dict(bias=torch.randn(20, dtype=torch.float16)), TypeError, "bias must have the dtype of hidden"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must have dtype int64, int32"),
        (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels must have 4 rows"),
        (dict(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels must be 1-D"),
        (dict(loss_weights=torch.ones(4, dtype=torch.float64)), TypeError, "loss_weights must have dtype float32"),
        (dict(loss_weights=torch.ones(3)), ValueError, "loss_weights must have 4 rows"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction=None), TypeError, "reduction must be a str"),
        (dict(normalizer=0.0), ValueError, "normalizer must be positive"),
        (dict(normalizer="n"), TypeError, "normalizer must be a float"),
        (dict(normalizer=torch.ones(1)), ValueError, "normalizer must be 0-D"),
        (dict(normalizer=torch.tensor(3)), TypeError, "normalizer must be a floating-point tensor"),
        (dict(normalizer=2.0, reduction="sum"), ValueError, "normalizer is only used with reduction='mean'"),
        (dict(chunk_size=0), ValueError, "chunk_size must be positive"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(precompute_grads=1), TypeError, "precompute_grads must be a bool"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(20, 8), labels=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ie.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ie.backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run linear_cross_entropy"):
        ie.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.int64))


def test_default_chunk_size():
    # ~256 MiB of float32 logits per chunk on GPU at InternVL3's vocabulary, a small chunk on CPU.
    assert default_chunk_size(151_674, torch.device("cuda")) == 442
    assert default_chunk_size(151_674, torch.device("cpu")) == 27
    assert default_chunk_size(10**9, torch.device("cuda")) == 1


@pytest.mark.gpu
def test_gpu_bfloat16_large_pack():
    device = torch.device("cuda")
    tokens, hidden_size, vocab = 16384, 896, 151_674
    hidden, weight, _, labels = _inputs(tokens, hidden_size, vocab, 4.0, torch.bfloat16, device, bias=False)
    loss_weights = _square_weights(labels)
    full_logits_bytes = tokens * vocab * 4
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with ie.backend("triton"):
        loss = ie.linear_cross_entropy(*leaves, labels, loss_weights=loss_weights)
        grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # Parameters' gradients (bf16 + the float32 accumulator) and one 442-token chunk: ~1 GiB, against
    # ~10 GB of float32 logits (5 GB in bfloat16).
    assert peak < full_logits_bytes / 6, f"peak {peak / 2**30:.2f} GiB"
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    del grads, loss
    # Accuracy on a slice (the float64 gold of the whole pack would need ~20 GB of logits per copy).
    rows = slice(0, 1024)
    _check_against_float64(
        "triton", torch.bfloat16, hidden[rows].detach(), weight.detach(), None, labels[rows], "gpu bf16",
        loss_weights=loss_weights[rows],
    )
