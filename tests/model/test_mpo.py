"""The MPO loss (model/train/mpo.py) against a float64 hand computation, term by term; precomputed reference values through the data path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.train.mpo import (
    MPO_BETA,
    MPO_WEIGHTS,
    RunningMean,
    batch_reward_mean,
    mpo_terms,
    pair_logps,
    segment_sums,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand_mpo(pc, pr, rc, rr, chosen_nll, chosen_tokens, shift, beta=MPO_BETA, weights=MPO_WEIGHTS):
    """The MPO loss of a batch written out in Python floats (float64)."""
    preference = quality = 0.0
    for i in range(len(pc)):
        chosen_ratio, rejected_ratio = pc[i] - rc[i], pr[i] - rr[i]
        preference += -log_sigmoid(beta * (chosen_ratio - rejected_ratio))
        reward_c, reward_r = beta * chosen_ratio, beta * rejected_ratio
        quality += -log_sigmoid(reward_c - shift) - log_sigmoid(-(reward_r - shift))
    pairs = len(pc)
    return weights[0] * preference / pairs + weights[1] * quality / pairs + weights[2] * sum(chosen_nll) / sum(chosen_tokens)


def test_mpo_loss_matches_float64_hand_computation():
    generator = torch.Generator().manual_seed(0)
    pairs = 7
    pc, pr, rc, rr = (-(torch.rand(pairs, generator=generator, dtype=torch.float64) * 40 + 1) for _ in range(4))
    tokens = torch.randint(1, 30, (pairs,), generator=generator).to(torch.float64)
    shift = 0.0375
    terms = mpo_terms(pc, pr, rc, rr, -pc, tokens, shift)
    loss = terms.loss()
    expected = hand_mpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), (-pc).tolist(), tokens.tolist(), shift)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) <= 1e-12 * abs(expected)
    # The rewards are beta times the log-ratios.
    torch.testing.assert_close(terms.rewards_chosen, MPO_BETA * (pc - rc), rtol=0, atol=1e-15)
    torch.testing.assert_close(terms.rewards_rejected, MPO_BETA * (pr - rr), rtol=0, atol=1e-15)


def test_mpo_terms_with_large_log_ratios_stay_finite():
    pc = torch.tensor([-1.0, -500.0], dtype=torch.float64)
    pr = torch.tensor([-900.0, -1.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    terms = mpo_terms(pc, pr, zeros, zeros, -pc, torch.ones(2, dtype=torch.float64), 0.0)
    expected = hand_mpo(pc.tolist(), pr.tolist(), [0.0, 0.0], [0.0, 0.0], (-pc).tolist(), [1.0, 1.0], 0.0)
    assert math.isfinite(terms.loss().item())
    assert abs(terms.loss().item() - expected) <= 1e-12 * abs(expected)


def test_mpo_gradient_matches_float64_finite_differences():
    pc = torch.tensor([-3.0, -7.5, -2.25], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -6.0, -9.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-3.5, -7.0, -2.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -6.5, -8.0], dtype=torch.float64)
    tokens = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: mpo_terms(a, b, rc, rr, -a, tokens, 0.01).loss(), (pc, pr))


def test_reward_shift_is_the_running_mean_of_batch_reward_means():
    running = RunningMean()
    batches = [([-2.0, -3.0], [-4.0, -1.0], [-2.5, -2.0], [-3.0, -2.0]), ([-1.0], [-5.0], [-1.5], [-4.0])]
    means = []
    for pc, pr, rc, rr in batches:
        value = batch_reward_mean(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)))
        rewards = [MPO_BETA * (a - b) for a, b in zip(pc, rc)] + [MPO_BETA * (a - b) for a, b in zip(pr, rr)]
        assert abs(value.item() - sum(rewards) / len(rewards)) < 1e-15
        means.append(value.item())
        shift = running.add(value.item(), 1)
        assert abs(shift - sum(means) / len(means)) < 1e-15
    assert RunningMean().add(sum(means), len(means)) == running.mean  # packs added together or one by one
    restored = RunningMean()
    restored.load_state_dict(json.loads(json.dumps(running.state_dict())))
    assert restored.mean == running.mean and restored.count == 2


def test_pair_logps_sum_each_response_and_split_the_pairs():
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 4, 6, 3]  # chosen, rejected, chosen, rejected
    roles = ["chosen", "rejected", "chosen", "rejected"]
    tokens = sum(lengths)
    labels = torch.randint(0, 11, (tokens,), generator=generator)
    labels[[0, 1, 5, 9, 10, 15, 17]] = -100
    token_logps = torch.where(labels != -100, -torch.rand(tokens, generator=generator), 0)
    cu_seqlens = torch.tensor([0, 5, 9, 15, 18], dtype=torch.int32)
    logps = pair_logps(token_logps, labels, cu_seqlens, roles)
    sums, counts = [], []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        sums.append(sum(token_logps[t].item() for t in range(start, end)))
        counts.append(sum(1 for t in range(start, end) if labels[t] != -100))
    torch.testing.assert_close(logps.chosen, torch.tensor([sums[0], sums[2]]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logps.rejected, torch.tensor([sums[1], sums[3]]), rtol=1e-6, atol=1e-6)
    assert logps.chosen_tokens.tolist() == [counts[0], counts[2]]
    assert segment_sums(torch.ones(tokens), cu_seqlens).tolist() == [float(length) for length in lengths]


def test_pair_logps_rejects_unpaired_packs():
    with pytest.raises(ValueError, match="pairs"):
        pair_logps(torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3], dtype=torch.int32), ["sample"])


def test_precomputed_reference_values_travel_with_the_pairs(tmp_path):
    """A preference record's ref_chosen_logp / ref_rejected_logp reach its PreferencePair (None when absent
    or not numbers), the data index counts the pairs carrying them, and a pack lists them pair by pair."""
    from model.data import ConversationEncoder, DatasetSpec, ImageTiler, PackingConfig, RecordDataset, collate, load_or_build_index
    from model.data.tokenizer import ByteTokenizer

    records = [
        {"question": "q", "chosen": "a", "rejected": "b", "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5},
        {"question": "q", "chosen": "c", "rejected": "d", "ref_chosen_logp": -3, "ref_rejected_logp": -0.5},
        {"question": "q", "chosen": "e", "rejected": "f", "ref_chosen_logp": "-1", "ref_rejected_logp": -0.5},
        {"question": "q", "chosen": "g", "rejected": "h"},
    ]
    path = tmp_path / "pref.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    spec = DatasetSpec("pref", str(path), root=str(tmp_path))
    encoder, tiler = ConversationEncoder(ByteTokenizer(), num_image_token=4, system_message=None), ImageTiler(tile_size=28)
    dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False)
    pairs = [dataset.load_record(index) for index in range(4)]
    assert [pair.reference for pair in pairs] == [(-1.5, -2.5), (-3.0, -0.5), None, None]
    assert load_or_build_index(spec, encoder, tiler).preference_pairs() == (4, 2)
    batch = collate([pairs[1], pairs[3], pairs[0]], PackingConfig(delta=0.25))
    assert batch.references == [(-3.0, -0.5), None, (-1.5, -2.5)] and batch.roles == ["chosen", "rejected"] * 3

def test_the_reference_model_stays_sharded_under_the_default_plan_and_the_dry_run_reports_it(tmp_path, monkeypatch):
    """Under the default plan (the vision tower zero2, the projector replicated) MPO's reference model is
    parallelized zero3: after a step, every parameter of it is its shard again (a zero2 component, resharded
    only after a backward, would stay whole after its no-grad forwards). A dry run reports its bytes per
    rank, the planner's reference_memory_bytes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from internvl3_engine.parallel import ParallelPlan
    from internvl3_engine.planner import ModelShape, reference_memory_bytes
    from model.train.demo_data import generate
    from model.train.trainer import Trainer
    from test_trainer import SMALL_DATA, small_config

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    generate(str(data), seed=0, config=SMALL_DATA)
    config = small_config(data, tmp_path / "run", mode="mpo", max_steps=1, data={"path": str(data / "meta_mpo.json")})
    try:
        with Trainer(config, plan=ParallelPlan(), show_progress=False, echo=lambda message: None) as trainer:
            assert trainer.reference is not None
            trainer.train_step()
            whole = [name for name, parameter in trainer.reference.named_parameters() if not isinstance(parameter, DTensor)]
            assert not whole, whole[:4]
        dry = config.updated({"max_steps": 0, "output_dir": str(tmp_path / "dry")})
        with Trainer(dry, plan=ParallelPlan(), show_progress=False, echo=lambda message: None) as trainer:
            report = trainer.train().memory[0]
            shape = ModelShape.from_modules(trainer.model_config.to_hf(), trainer.model)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert report["reference_bytes"] == report["parameter_bytes"] == pytest.approx(reference_memory_bytes(shape, ParallelPlan(), 1), rel=1e-3)
