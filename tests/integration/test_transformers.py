"""internvl3_engine.integrations.transformers: transformers' InternVL and Qwen2 patched in place give the
unpatched models' outputs and gradients (float32, relative 1e-4) on padded batches, packed rows and images;
float V2PE positions equal the reference model's; a plain training loop runs unchanged; generation with a KV
cache gives the same tokens; square-averaged loss weights; patching twice is harmless; the engine's activation
checkpointing (checkpoint_blocks, or a plan under parallelize) trains as without it; transformers stays
optional. CI runs this file on the newest and the oldest transformers release that pyproject's extra allows."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import internvl3_engine as engine

transformers = pytest.importorskip("transformers")
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from internvl3_engine.integrations.transformers import (  # noqa: E402
    ATTENTION_IMPLEMENTATION,
    apply_internvl3_engine_to_internvl,
    apply_internvl3_engine_to_qwen2,
)
from internvl3_engine.parallel import checkpoint_blocks  # noqa: E402

IMG = 261
PER_TILE = 4
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=262, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})


def perturbed(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.float().eval()


def internvl() -> InternVLForConditionalGeneration:
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                  patch_size=14)
    config = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMG,
                            image_seq_length=PER_TILE)
    return perturbed(InternVLForConditionalGeneration(config))


def qwen2() -> Qwen2ForCausalLM:
    return perturbed(Qwen2ForCausalLM(Qwen2Config(**TEXT)))


def text_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,))


def image_ids(tiles: int) -> torch.Tensor:
    return torch.full((tiles * PER_TILE,), IMG)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def labels_for(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    labels = ids.clone()
    labels[ids == IMG] = -100
    if mask is not None:
        labels[mask == 0] = -100
    return labels


def outputs_and_grads(model, batch: dict):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(reference, patched, batch: dict, valid: torch.Tensor | None = None):
    """Same loss, same logits on the valid tokens, same gradients for every parameter (relative 1e-4)."""
    expected, expected_grads = outputs_and_grads(reference, batch)
    actual, actual_grads = outputs_and_grads(patched, batch)
    assert rel_err(actual.loss, expected.loss) <= 1e-4
    keep = torch.ones(expected.logits.shape[:2], dtype=torch.bool) if valid is None else valid.bool()
    assert rel_err(actual.logits[keep], expected.logits[keep]) <= 1e-4
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if grad.abs().max() > 0:
            assert rel_err(actual_grads[name], grad) <= 1e-4, name
        else:
            assert actual_grads[name].abs().max() == 0, name


def padded_batch_with_images():
    """Row 0: text, an image of 2 tiles, text, right-padded; row 1: left-padded text with a 1-tile image."""
    rows = [torch.cat([text_ids(3), image_ids(2), text_ids(4)]), torch.cat([text_ids(2), image_ids(1), text_ids(3)])]
    length = 18
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    ids[0, : len(rows[0])], mask[0, : len(rows[0])] = rows[0], 1
    ids[1, length - len(rows[1]):], mask[1, length - len(rows[1]):] = rows[1], 1
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 56, 56), labels=labels_for(ids, mask))
    return batch, mask


def packed_row():
    """Three samples in one row [1, T], position_ids restarting at 0 for each; the second has an image."""
    samples = [text_ids(5), torch.cat([text_ids(2), image_ids(1), text_ids(4)]), text_ids(3)]
    ids = torch.cat(samples)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in samples])[None]
    labels = labels_for(ids)
    starts = engine.cu_seqlens_from_lengths([len(s) for s in samples])[:-1].long()
    labels[0, starts] = -100  # as transformers' DataCollatorWithFlattening: no target across samples
    # use_cache=False: transformers itself splits a row at restarting position_ids only without a KV cache (the
    # patched model always does).
    batch = dict(input_ids=ids, position_ids=position_ids, pixel_values=torch.randn(1, 3, 56, 56), labels=labels,
                 use_cache=False)
    return batch, samples


def test_padded_batch_with_images_matches_the_unpatched_model():
    reference = internvl()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    language = patched.model.language_model
    assert language.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert patched.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert patched.model.vision_tower.config._attn_implementation == ATTENTION_IMPLEMENTATION
    batch, mask = padded_batch_with_images()
    assert_same(reference, patched, batch, mask)


def test_packed_row_matches_the_unpatched_model_and_cu_seqlens():
    reference = internvl()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    batch, samples = packed_row()
    assert_same(reference, patched, batch)
    # the same boundaries given as cu_seqlens (FlashAttention's name too), and each sample alone
    cu_seqlens = engine.cu_seqlens_from_lengths([len(s) for s in samples])
    with torch.no_grad():
        from_positions = patched(**batch).logits
        for name in ("cu_seqlens", "cu_seq_lens_q"):
            given = patched(**batch, **{name: cu_seqlens}).logits
            assert rel_err(given, from_positions) <= 1e-6
        alone = patched(input_ids=samples[0][None]).logits
    assert rel_err(from_positions[:, : len(samples[0])], alone) <= 1e-5


def test_float_v2pe_positions_equal_the_reference_model(tmp_path):
    """delta 0.5: fractional position_ids in a packed row give the reference model's logits (InternVL3 on the
    same checkpoint with cu_seqlens and V2PE positions). Unpatched transformers would split the row wherever
    consecutive positions differ by anything but 1, i.e. inside every image."""
    from model.modeling import InternVL3

    reference = internvl()
    reference.save_pretrained(tmp_path)
    ours = InternVL3.from_pretrained(tmp_path).eval()
    patched = apply_internvl3_engine_to_internvl(reference)
    samples = [torch.cat([text_ids(3), image_ids(2), text_ids(3)]), torch.cat([image_ids(1), text_ids(4)])]
    ids = torch.cat(samples)
    cu_seqlens = engine.cu_seqlens_from_lengths([len(s) for s in samples])
    positions = engine.v2pe_position_ids(ids == IMG, cu_seqlens, 0.5)
    assert positions[3].item() == 2.5 and positions[len(samples[0])].item() == -0.5  # fractional, restarting
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = ours(ids, pixel_values=pixels, cu_seqlens=cu_seqlens, positions=positions).logits
        actual = patched(input_ids=ids[None], pixel_values=pixels, position_ids=positions[None]).logits[0]
    assert rel_err(actual, expected) <= 1e-4


def test_a_plain_training_loop_runs_unchanged():
    reference = internvl().train()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference)).train()
    batches = [padded_batch_with_images()[0], packed_row()[0], padded_batch_with_images()[0]]

    def train(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for batch in batches:
            optimizer.zero_grad()
            out = model(**batch)
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        return losses, out

    expected, _ = train(reference)
    actual, last = train(patched)
    assert last.logits is None  # the fused loss never built them
    for a, e in zip(actual, expected):
        assert abs(a - e) <= 1e-4 * abs(e)
    # num_items_in_batch (as transformers' Trainer passes it) divides the summed loss
    batch = batches[0]
    count = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        given = patched(**batch, num_items_in_batch=count * 2).loss
        plain = patched(**batch).loss
    assert abs(given.item() - plain.item() / 2) <= 1e-5 * plain.item()


def sgd_steps(model, batches):
    """Losses of an SGD step on each batch, and the last step's gradients (sharded ones gathered)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for batch in batches:
        out, grads = outputs_and_grads(model, batch)
        optimizer.step()
        losses.append(out.loss.item())
    return losses, {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def assert_same_training(actual, expected):
    (actual_losses, actual_grads), (expected_losses, expected_grads) = actual, expected
    assert actual_losses == pytest.approx(expected_losses, rel=1e-6)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert rel_err(actual_grads[name], grad) <= 1e-6, name


def training_batches():
    """Padded batches with images (the model's default use_cache=True) around a packed row."""
    return [padded_batch_with_images()[0], packed_row()[0], padded_batch_with_images()[0]]


def test_checkpointed_blocks_train_as_without_checkpointing():
    """checkpoint_blocks on the language and vision blocks: the same losses and gradients (float32) as the
    uncheckpointed model, the KV cache turned off with a warning (recomputing a block would write it twice);
    generation, under torch.no_grad, keeps its cache and gives the same tokens."""
    reference = internvl().train()
    plain = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    checkpointed = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    checkpoint_blocks(checkpointed.model.language_model.layers)
    checkpoint_blocks(checkpointed.model.vision_tower.encoder.layer)
    ids = torch.cat([text_ids(2), image_ids(1), text_ids(3)])[None]
    pixels = torch.randn(1, 3, 56, 56)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(checkpointed.generate(input_ids=ids, pixel_values=pixels, **options),
                       plain.generate(input_ids=ids, pixel_values=pixels, **options))
    batches = training_batches()
    expected = sgd_steps(plain, batches)
    with pytest.warns(UserWarning, match="without a KV cache"):
        actual = sgd_steps(checkpointed, batches)
    assert_same_training(actual, expected)


def test_a_one_process_plan_that_checkpoints_trains_as_without_it():
    """parallelize with activation checkpointing in the vision and language plans (one gloo process): the
    unparallelized model's losses and gradients."""
    import torch.distributed as dist

    from internvl3_engine.parallel import ComponentPlan, ParallelPlan, parallelize

    reference = internvl().train()
    plain = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    planned = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    batches = training_batches()
    expected = sgd_steps(plain, batches)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = ParallelPlan(vision=ComponentPlan("zero2", activation_checkpointing=True),
                            language=ComponentPlan(activation_checkpointing=True))
        parallelize(planned, plan)
        with pytest.warns(UserWarning, match="without a KV cache"):
            actual = sgd_steps(planned, batches)
    finally:
        dist.destroy_process_group()
    assert_same_training(actual, expected)


def test_patching_twice_is_harmless():
    reference = internvl()
    once = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    twice = apply_internvl3_engine_to_internvl(apply_internvl3_engine_to_internvl(copy.deepcopy(reference)))
    hooks = twice.model.language_model._forward_pre_hooks
    assert len(hooks) == len(once.model.language_model._forward_pre_hooks) == 1
    batch, mask = padded_batch_with_images()
    with torch.no_grad():
        assert torch.equal(once(**batch).logits, twice(**batch).logits)
    assert_same(reference, twice, batch, mask)


@pytest.mark.parametrize(
    "options",
    [dict(attention=False), dict(rotary=False), dict(pixel_unshuffle_layernorm=False, cross_entropy=False)],
)
def test_parts_can_be_left_out(options):
    reference = internvl()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference), **options)
    if not options.get("attention", True):
        assert patched.model.language_model.config._attn_implementation != ATTENTION_IMPLEMENTATION
    batch, mask = padded_batch_with_images()
    assert_same(reference, patched, batch, mask)


def test_qwen2_padded_batch_and_generation_with_a_cache():
    reference = qwen2()
    patched = apply_internvl3_engine_to_qwen2(copy.deepcopy(reference))
    ids = torch.randint(0, 262, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as for generation
    assert_same(reference, patched, dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)), mask)
    # greedy generation: prefill through the engine, decoding over the KV cache (rotated keys)
    options = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, **options), reference.generate(ids, **options))


def _weighted_reference_loss(model, batch: dict, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * CE) / sum(w) from the unpatched model's logits, weights at the labels' positions."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    shifted = torch.nn.functional.pad(weights, (0, 1))[..., 1:]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return (shifted.flatten() * ce).sum() / shifted.sum()


def _square_weights_by_hand(labels: torch.Tensor, sample_of_token: torch.Tensor) -> torch.Tensor:
    """InternVL3's square weights at the labels' positions: 1/sqrt(x), x the supervised targets of the sample
    whose token predicts that label (label t is predicted by token t - 1)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    supervised = (targets != -100).flatten()
    owner = sample_of_token.flatten()
    counts = torch.zeros(int(owner.max()) + 1).index_add_(0, owner, supervised.float())
    weights = torch.where(supervised, counts[owner].clamp_min(1).rsqrt(), torch.zeros(()))
    # back to the labels' positions: the weight of target t belongs to label t + 1
    return torch.nn.functional.pad(weights.view_as(labels)[..., :-1], (1, 0))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_square_averaged_loss_weights(layout):
    """loss_weights="square" (per sample: rows of a padded batch, position_ids restarts of a packed row) and a
    weight tensor give sum(w * CE) / sum(w) of the unpatched model's logits, with its gradients."""
    reference = internvl()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    if layout == "padded":
        batch, _ = padded_batch_with_images()
        sample_of_token = torch.arange(2)[:, None].expand(2, batch["input_ids"].shape[1])
    else:
        batch, samples = packed_row()
        sample_of_token = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(s) for s in samples]))[None]
    weights = _square_weights_by_hand(batch["labels"], sample_of_token)
    assert len(set(weights[weights > 0].tolist())) > 1  # samples of different lengths: not a token mean
    uneven = torch.rand(weights.shape) * 4 * (weights > 0)  # a weight tensor far from any mean

    for given, expected_weights in (("square", weights), (uneven, uneven)):
        reference.zero_grad()
        expected = _weighted_reference_loss(reference, batch, expected_weights)
        expected.backward()
        patched.zero_grad()
        actual = patched(**batch, loss_weights=given).loss
        actual.backward()
        assert rel_err(actual, expected) <= 1e-4
        for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
            if p.grad is not None and p.grad.abs().max() > 0:
                assert rel_err(q.grad, p.grad) <= 1e-4, name
    with pytest.raises(ValueError, match="num_items_in_batch"):
        patched(**batch, loss_weights="square", num_items_in_batch=7)
    with pytest.raises(ValueError, match="loss_weights must have the labels' shape"):
        patched(**batch, loss_weights=weights[:, 1:])
    with pytest.raises(ValueError, match="mode"):
        patched(**batch, loss_weights="squared")


def test_internvl_generation_with_an_image_and_a_cache():
    """Greedy tokens of the patched InternVL equal the unpatched model's: the prefill with an image through the
    engine, decoding over the KV cache; positional input_ids and tuple outputs pass through."""
    reference = internvl()
    patched = apply_internvl3_engine_to_internvl(copy.deepcopy(reference))
    ids = torch.cat([text_ids(2), image_ids(2), text_ids(3)])[None]
    pixels = torch.randn(2, 3, 56, 56)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, pixel_values=pixels, **options)
        assert torch.equal(patched.generate(input_ids=ids, pixel_values=pixels, **options), expected)
        as_tuple = patched(ids, pixel_values=pixels, return_dict=False)
        assert rel_err(as_tuple[0], reference(ids, pixel_values=pixels).logits) <= 1e-4


def test_bad_models_and_masks_raise():
    with pytest.raises(TypeError, match="InternVL"):
        apply_internvl3_engine_to_internvl(qwen2())
    with pytest.raises(TypeError, match="Qwen2Model"):
        apply_internvl3_engine_to_qwen2(torch.nn.Linear(2, 2))
    patched = apply_internvl3_engine_to_qwen2(qwen2())
    ids = torch.randint(0, 262, (1, 6))
    with pytest.raises(ValueError, match="2-D attention_mask"):
        patched(input_ids=ids, attention_mask=torch.zeros(1, 1, 6, 6))


def test_missing_transformers_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers is not installed"):
        apply_internvl3_engine_to_internvl(object())
    with pytest.raises(ImportError, match="pip install"):
        apply_internvl3_engine_to_qwen2(object())


def test_the_engine_does_not_import_transformers():
    code = (
        "import sys, internvl3_engine, internvl3_engine.integrations.transformers; "
        "assert 'transformers' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _tensor_parallel_worker(rank: int, init_file: str, errors):
    import traceback

    import torch.distributed as dist

    from internvl3_engine.parallel import ParallelPlan, clip_grad_norm_, parallelize

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        torch.set_num_threads(1)
        losses, state = {}, {}
        for name in ("single", "tp"):
            torch.manual_seed(0)
            model = apply_internvl3_engine_to_internvl(internvl().train())
            batch, _ = padded_batch_with_images()
            if name == "tp":
                parallelize(model, ParallelPlan(tp=2))
            # SGD: AdamW would amplify the rounding noise of the k bias's (mathematically zero) gradient.
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            losses[name] = []
            for _ in range(2):
                optimizer.zero_grad()
                loss = model(**batch).loss
                loss.backward()
                clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                losses[name].append(loss.item())
            state[name] = model.state_dict()
        assert losses["tp"] == pytest.approx(losses["single"], rel=1e-5)
        for key, value in state["single"].items():
            full = state["tp"][key].full_tensor()
            torch.testing.assert_close(full, value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
        # Both ranks leave together: a rank tearing gloo down while its peer still runs aborted once in CI
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_the_scheduler_shards_transformers_internvl_with_tensor_parallelism(tmp_path):
    """parallelize finds transformers' component names; tp = 2 over 2 gloo ranks trains the patched model
    exactly as one process does."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(_tensor_parallel_worker, args=(str(tmp_path / "init"), errors), nprocs=2, join=True,
                       start_method="spawn")
    if not errors.empty():
        pytest.fail(errors.get())
