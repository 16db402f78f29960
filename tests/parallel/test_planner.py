"""The parallelism planner: presets, the FLOP formula, the memory model, the search, calibration and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from internvl3_engine.parallel.plan import ComponentPlan, ParallelPlan
from internvl3_engine.planner import (
    DEFAULT_EFFICIENCY, GPUS, PRESETS, Assumptions, ComponentShape, ModelShape, Workload, calibrate, estimate,
    model_shape, preset_config, recommend, training_flops,
)
from internvl3_engine.planner.__main__ import main
from internvl3_engine.planner.cost import context_parallel_bytes, language_activation_bytes_per_token
from internvl3_engine.planner.hardware import GIB, datasheet_bf16_flops
from internvl3_engine.planner.search import PREDICTION_MARGIN, alike, candidate_plans

pytest.importorskip("transformers")

GIGA = 10**9


@pytest.fixture(scope="module")
def shape_78b():
    return model_shape("internvl3-78b")


def tiny_shape(**changes) -> ModelShape:
    """A hand-sized shape: LLM 2 blocks of 100 parameters + 50 outside, ViT 2 blocks of 40 + 20, projector 30."""
    fields = dict(
        name="hand", vision=ComponentShape(100, 90, 2, 40), projector=ComponentShape(30, 30, 0, 0),
        language=ComponentShape(250, 220, 2, 100), vision_layers=2, vision_hidden=8, vision_heads=2,
        vision_intermediate=16, vision_tokens_per_tile=5, tokens_per_tile=1, projector_in_features=32, layers=2,
        hidden=16, heads=4, kv_heads=2, head_dim=4, intermediate=32, vocab=10, tied_head=False,
    )
    return ModelShape(**{**fields, **changes})


def plan_of(vision: str, projector: str, language: str, **kwargs) -> ParallelPlan:
    return ParallelPlan(vision=ComponentPlan(vision), projector=ComponentPlan(projector), language=ComponentPlan(language), **kwargs)


# ---- presets

def test_presets_are_the_reference_models():
    model_config = pytest.importorskip("model.config")
    for name in PRESETS:
        config = model_config.InternVL3Config.preset(name)
        assert config.to_hf() | {"_name_or_path": name} == preset_config(name)
        assert model_config.InternVL3Config.from_hf(preset_config(name)).to_dict() == config.to_dict()
    assert model_config.PRESETS == ("tiny",) + PRESETS


def test_preset_config_is_fresh_and_checked():
    preset_config("internvl3-1b")["text_config"]["hidden_size"] = 1
    assert preset_config("internvl3-1b")["text_config"]["hidden_size"] == 896
    with pytest.raises(ValueError, match="preset"):
        preset_config("internvl3-3b")


def test_model_shape_counts_match_the_reference_model(shape_78b):
    modeling = pytest.importorskip("model.modeling")
    config = pytest.importorskip("model.config").InternVL3Config.preset("internvl3-78b")
    with torch.device("meta"):
        reference = modeling.InternVL3(config)
    counts = reference.num_parameters()
    assert ModelShape.from_modules(config.to_hf(), reference, name=config.name) == shape_78b
    assert shape_78b.vision.parameters == counts["vision"] and shape_78b.language.parameters == counts["language"]
    embedding = shape_78b.vocab * shape_78b.hidden
    assert shape_78b.language.matmul_parameters == counts["language"] - embedding
    assert shape_78b.vision.parameters - shape_78b.vision.matmul_parameters == 1026 * 3200  # position embedding + CLS
    assert (shape_78b.layers, shape_78b.heads, shape_78b.kv_heads, shape_78b.head_dim, shape_78b.tokens_per_tile) == (80, 64, 8, 128, 256)


def test_model_shape_tied_head_and_config_file(tmp_path):
    config = preset_config("internvl3-1b")
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    tied, untied = model_shape(tmp_path), model_shape("internvl3-1b")
    embedding = untied.vocab * untied.hidden
    assert tied.tied_head and tied.language.parameters == untied.language.parameters - embedding
    assert tied.language.matmul_parameters == untied.language.matmul_parameters  # the head's matmul still runs
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="InternVL"):
        model_shape(tmp_path / "other.json")


# ---- FLOPs

def test_training_flops_by_hand():
    shape = tiny_shape()
    flops = training_flops(shape, tokens=10, tiles=3, sample_lengths=[6, 4])
    assert flops["llm_matmuls"] == 6 * 220 * 10
    assert flops["llm_attention"] == 12 * 2 * 4 * 4 * (36 + 16) / 2
    assert flops["vit_matmuls"] == 3 * 6 * 90 * 5
    assert flops["vit_attention"] == 3 * 12 * 2 * 8 * 25
    assert flops["projector"] == 3 * 6 * 30 * 1
    assert flops["total"] == sum(value for key, value in flops.items() if key != "total")


# ---- memory

def test_memory_by_hand_and_ordering():
    shape, gpu, workload = tiny_shape(), GPUS["h100"], Workload(tokens_per_pack=10, tiles_per_pack=3, sample_length=5)
    costs = {
        sharding: estimate(shape, plan_of(sharding, sharding, sharding, prefetch=0), 4, gpu, workload, Assumptions())
        for sharding in ("replicate", "zero2", "zero3")
    }
    language = {sharding: cost.components["language"] for sharding, cost in costs.items()}
    # 250 parameters (2 blocks of 100, 50 outside) over 4 ranks: fp32 master shard + bf16 gathered copies
    assert language["zero3"].parameters_bytes == 250 / 4 * 4 + (50 + 100) * 2  # prefetch 0: one block at a time
    assert language["zero2"].parameters_bytes == 250 / 4 * 4 + 250 * 2
    assert language["replicate"].parameters_bytes == 250 * 4 + 250 * 2
    assert language["zero3"].gradients_bytes == 250 / 4 * 4 + 100 * 2  # + the largest unit's bf16 gradients
    assert language["zero3"].optimizer_bytes == 250 / 4 * 8
    layer, _ = language_activation_bytes_per_token(shape, tp=1)
    assert layer == 4 * 16 * 2 + (2 * 16 + 2 * 8 + 4 * 32) * 2 + 4 * 4
    assert language["zero3"].activations_bytes == 10 * (2 * layer + layer)
    memory = [costs[sharding].memory_bytes for sharding in ("zero3", "zero2", "replicate")]
    assert memory == sorted(memory) and len(set(memory)) == 3


def test_an_mpo_reference_model_by_hand():
    """Workload(reference_model=True): the reference's float32 shards, zero3 over all 4 ranks whatever the
    plan (100 + 30 + 250 parameters), add to the memory; its forwards (a third of each component's training
    compute, plus their exposed gathers) add to the step; MFU still counts the training FLOPs only."""
    from internvl3_engine.planner import reference_memory_bytes

    shape, gpu = tiny_shape(), GPUS["h100"]
    plan = plan_of("zero2", "replicate", "zero3", prefetch=0)
    workload = Workload(tokens_per_pack=10, tiles_per_pack=3, sample_length=5)
    plain = estimate(shape, plan, 4, gpu, workload, Assumptions())
    mpo = estimate(shape, plan, 4, gpu, dataclasses.replace(workload, reference_model=True), Assumptions())
    assert reference_memory_bytes(shape, plan, 4) == (100 + 30 + 250) / 4 * 4 == mpo.reference_bytes
    assert mpo.memory_bytes == plain.memory_bytes + mpo.reference_bytes and plain.reference_bytes == 0
    forward = sum(part.compute_s for part in plain.components.values()) / 3
    assert forward < mpo.reference_s and mpo.step_s == pytest.approx(plain.step_s + mpo.reference_s)
    assert mpo.model_flops_per_gpu == plain.model_flops_per_gpu
    with pytest.raises(TypeError, match="reference_model"):
        Workload(reference_model=1)


def test_collective_latency_by_hand():
    """A tiny model's communication is latency: zero3 over 4 ranks of one node runs, per FSDP unit (2 blocks +
    the rest), a gather in forward and a gather plus a reduce-scatter in backward."""
    shape, gpu, workload = tiny_shape(), GPUS["h100"], Workload(tokens_per_pack=10, tiles_per_pack=3, sample_length=5)
    plan = plan_of("zero3", "zero3", "zero3", prefetch=0)
    with_latency = estimate(shape, plan, 4, gpu, workload, Assumptions(collective_latency_s=1e-3))
    without = estimate(shape, plan, 4, gpu, workload, Assumptions(collective_latency_s=0.0))
    added = with_latency.components["language"].communication_s - without.components["language"].communication_s
    assert added == pytest.approx(3 * 3 * 1e-3)
    alone = estimate(shape, plan, 1, gpu, workload, Assumptions(collective_latency_s=1e-3))
    assert alone.components["language"].communication_s == 0  # no collective on one GPU
    with pytest.raises(ValueError, match="collective_latency_s"):
        Assumptions(collective_latency_s=-1.0)


def test_checkpointing_keeps_block_inputs(shape_78b):
    gpu, workload = GPUS["h100"], Workload()
    plain = estimate(shape_78b, plan_of("zero3", "zero3", "zero3"), 256, gpu, workload, Assumptions())
    checkpointed = estimate(
        shape_78b, ParallelPlan(language=ComponentPlan("zero3", activation_checkpointing=True)), 256, gpu, workload,
        Assumptions(),
    )
    layer, block_input = language_activation_bytes_per_token(shape_78b, tp=1)
    assert checkpointed.components["language"].activations_bytes == workload.tokens_per_pack * (80 * block_input + layer)
    assert checkpointed.components["language"].activations_bytes < plain.components["language"].activations_bytes / 10
    assert checkpointed.components["language"].compute_s > plain.components["language"].compute_s  # recomputation


def test_more_gpus_never_increase_zero3_parameter_memory(shape_78b):
    plan, previous = plan_of("zero3", "zero3", "zero3"), None
    for gpus in (8, 16, 64, 256, 1024):
        cost = estimate(shape_78b, plan, gpus, GPUS["h100"], Workload(), Assumptions())
        parameters = sum(part.parameters_bytes + part.gradients_bytes + part.optimizer_bytes for part in cost.components.values())
        assert previous is None or parameters <= previous
        previous = parameters


# ---- search

def test_78b_on_256_h100_fits(shape_78b):
    recommendation = recommend(shape_78b, 256, GPUS["h100"])
    best = recommendation.best
    assert best is not None and best.memory_bytes <= 0.9 * 80 * GIB
    assert isinstance(best.plan, ParallelPlan) and best.plan.language.sharding == "zero3"
    assert best.plan.language.param_dtype == torch.bfloat16 and best.plan.language.reduce_dtype == torch.float32
    assert 0.1 < best.mfu <= DEFAULT_EFFICIENCY
    assert all(alternative.tokens_per_s_per_gpu <= best.tokens_per_s_per_gpu / (1 - PREDICTION_MARGIN)
               for alternative in recommendation.alternatives)


def test_1b_on_8_gpus_needs_no_full_sharding():
    best = recommend(model_shape("internvl3-1b"), 8, GPUS["h100"]).best
    assert best is not None and best.fits
    assert any(best.plan.component(name).sharding in ("replicate", "zero2") for name in ("vision", "projector", "language"))


def test_nothing_fits_says_why(shape_78b):
    recommendation = recommend(shape_78b, 1, GPUS["h100"])
    assert recommendation.best is None and "no plan fits" in recommendation.reason


def test_tensor_parallel_degrees_divide_heads():
    recommendation = recommend(model_shape("internvl3-1b"), 8, GPUS["h100"])  # 14 heads, 2 kv heads
    assert set(recommendation.skipped_tp) == {4, 8}


def test_bad_gpus():
    with pytest.raises(ValueError, match="gpus"):
        recommend(tiny_shape(), 12, GPUS["h100"])
    with pytest.raises(ValueError, match="gpus"):
        recommend(tiny_shape(), 0, GPUS["h100"])
    with pytest.raises(ValueError, match="top"):
        recommend(tiny_shape(), 4, GPUS["h100"], top=0)


def _all_costs(shape, gpus, workload):
    plans, _ = candidate_plans(shape, gpus, GPUS["h100"])
    return [estimate(shape, plan, gpus, GPUS["h100"], workload, Assumptions()) for plan in plans]


def test_a_plan_as_fast_within_the_margin_with_more_headroom_wins():
    """InternVL3-8B, 128K-token packs on 8 H100: the fastest plan (cp 2, 66 of 72 GiB) gains less than the cost
    model can resolve over cp 4 plans that leave far more headroom; the leanest of the plans within the margin
    of the fastest is recommended."""
    shape, workload = model_shape("internvl3-8b"), Workload(tokens_per_pack=131072)
    fitting = [cost for cost in _all_costs(shape, 8, workload) if cost.fits]
    fastest = max(fitting, key=lambda cost: cost.tokens_per_s_per_gpu)
    best = recommend(shape, 8, GPUS["h100"], workload).best
    assert fastest.plan.cp == 2 and fastest.memory_bytes > 0.9 * fastest.memory_budget_bytes
    assert best.plan.cp == 4 and best.memory_bytes < 0.5 * best.memory_budget_bytes
    close = [cost for cost in fitting if cost.tokens_per_s_per_gpu >= (1 - PREDICTION_MARGIN) * fastest.tokens_per_s_per_gpu]
    assert best in close and best.memory_bytes == min(cost.memory_bytes for cost in close)


def test_runners_up_are_no_variants_of_a_plan_listed():
    """Plans that differ from a listed one only in ways the model cannot resolve (e.g. the projector's
    sharding: the same step time, half a GiB) are left out; those listed differ in layout, or in step time or
    memory by more than the margin."""
    shape, workload = model_shape("internvl3-8b"), Workload(tokens_per_pack=131072)
    recommendation = recommend(shape, 8, GPUS["h100"], workload, top=6)
    listed = [recommendation.best] + recommendation.alternatives
    assert len(listed) == 6
    assert not any(alike(cost, other) for index, cost in enumerate(listed) for other in listed[:index])
    projector_variants = [cost for cost in _all_costs(shape, 8, workload) if cost.fits and cost.plan != listed[0].plan
                          and cost.plan == dataclasses.replace(listed[0].plan, projector=cost.plan.projector)]
    assert projector_variants and all(alike(cost, listed[0]) for cost in projector_variants)
    assert not any(cost.plan in [other.plan for other in listed] for cost in projector_variants)


def test_a_pack_that_cannot_hold_its_tiles_is_an_error(capsys):
    """2,000 tiles of 256 image tokens do not fit a 16K-token pack: a ValueError naming the numbers, from the
    search, from one estimate and from the command (one line, status 2)."""
    shape, workload = model_shape("internvl3-8b"), Workload(tokens_per_pack=16384, tiles_per_pack=2000)
    message = "tiles_per_pack 2000 x 256 image tokens a tile of internvl3-8b = 512,000 tokens, more than tokens_per_pack 16,384"
    with pytest.raises(ValueError) as caught:
        recommend(shape, 8, GPUS["h100"], workload)
    assert str(caught.value) == message
    with pytest.raises(ValueError, match="more than tokens_per_pack"):
        estimate(shape, ParallelPlan(), 8, GPUS["h100"], workload, Assumptions())
    Workload(tokens_per_pack=16384, tiles_per_pack=64).check(shape)  # 64 x 256 = 16,384: a pack of image tokens only
    assert main(["--preset", "internvl3-8b", "--tiles-per-pack", "2000"]) == 2
    assert capsys.readouterr().err == f"python -m internvl3_engine.planner: error: {message}\n"


def test_warnings_for_a_workload_taken_otherwise_and_a_plan_at_the_budget(capsys):
    shape = model_shape("internvl3-8b")
    assert recommend(shape, 8, GPUS["h100"]).warnings == []
    long_samples = recommend(shape, 8, GPUS["h100"], Workload(sample_length=32768))
    assert long_samples.warnings == ["sample_length 32,768 is longer than tokens_per_pack 16,384: costed as one sample filling the pack"]
    short = Workload(tokens_per_pack=8192, tiles_per_pack=4, sample_length=100).warnings(shape)
    assert short == ["samples of 100 tokens cannot hold a tile's 256 image tokens (tiles_per_pack 4)"]
    # A GPU whose budget the leanest plan fills but for 2%: the recommended plan is within the margin of it.
    hand, workload = tiny_shape(), Workload(tokens_per_pack=10, tiles_per_pack=3, sample_length=5)
    leanest = min(cost.memory_bytes for cost in _all_costs(hand, 4, workload))
    small = dataclasses.replace(GPUS["h100"], hbm_bytes=leanest / 0.98 / Assumptions().memory_fraction)
    at_budget = recommend(hand, 4, small, workload)
    assert at_budget.best.memory_bytes == leanest
    assert len(at_budget.warnings) == 1 and at_budget.warnings[0].startswith("the recommended plan needs ")
    assert "within the cost model's 3% margin of the budget: it may run out of memory" in at_budget.warnings[0]
    efficiency = ["--efficiency", str(Assumptions().compute_efficiency)]  # as recommend's default (no calibration)
    assert main(["--preset", "internvl3-8b", "--sample-length", "32768", "--json", "--top", "1"] + efficiency) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == long_samples.warnings
    assert main(["--preset", "internvl3-8b", "--sample-length", "32768", "--top", "1"] + efficiency) == 0
    assert "warning: sample_length 32,768 is longer than tokens_per_pack 16,384" in capsys.readouterr().out


# ---- calibration

def _record(name: str, rows: list[dict]) -> dict:
    return {"schema": 1, "suite": "train", "device": {"type": "cuda", "name": name}, "train": rows}


def test_calibration_from_results(tmp_path):
    assert calibrate(GPUS["h100"], tmp_path).efficiency == DEFAULT_EFFICIENCY
    assert calibrate(GPUS["h100"], None).efficiency == DEFAULT_EFFICIENCY
    rows = [
        {"preset": "internvl3-1b", "status": "ok", "median_step_ms": 100.0, "mfu_vs_datasheet": 0.31},
        {"preset": "internvl3-2b", "status": "ok", "median_step_ms": 200.0, "mfu_vs_datasheet": 0.37},
        {"preset": "internvl3-8b", "status": "skipped", "reason": "out of memory"},
    ]
    (tmp_path / "2025-01-01-h100-train-real.json").write_text(json.dumps(_record("NVIDIA H100 80GB HBM3", rows)))
    (tmp_path / "2025-01-01-pcie-train-real.json").write_text(json.dumps(_record("NVIDIA H100 PCIe", rows[:1])))
    (tmp_path / "notes.json").write_text("not json")
    calibration = calibrate(GPUS["h100"], tmp_path)
    assert calibration.efficiency == 0.37 and "internvl3-2b" in calibration.source
    assert calibrate(GPUS["h200"], tmp_path).efficiency == DEFAULT_EFFICIENCY
    assert datasheet_bf16_flops("NVIDIA H100 PCIe") == 756e12 and datasheet_bf16_flops("Tesla T4") is None


# ---- the command line

def test_cli_78b_tables():
    result = subprocess.run(
        [sys.executable, "-m", "internvl3_engine.planner", "--preset", "internvl3-78b", "--gpus", "256", "--gpu", "h100"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stderr
    for text in ("Recommended plan", "language", "zero3", "tokens/s/GPU", "Assumptions", "989 TFLOP/s"):
        assert text in result.stdout


def test_cli_json(tmp_path, capsys):
    rows = [{"preset": "internvl3-2b", "status": "ok", "median_step_ms": 200.0, "mfu_vs_datasheet": 0.35}]
    (tmp_path / "record.json").write_text(json.dumps(_record("NVIDIA H100 80GB HBM3", rows)))
    assert main(["--preset", "internvl3-8b", "--gpus", "64", "--json", "--results", str(tmp_path), "--top", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["assumptions"]["compute_efficiency"] == 0.35
    assert result["best"]["memory_bytes"] <= result["best"]["memory_budget_bytes"]
    assert result["best"]["plan"]["language"]["param_dtype"] == "bfloat16"
    assert len(result["alternatives"]) == 2 and result["model"]["layers"] == 28


def test_cli_counts_an_mpo_reference_model(capsys):
    assert main(["--preset", "internvl3-8b", "--gpus", "8", "--json", "--top", "1", "--reference-model"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["workload"]["reference_model"] is True
    assert result["best"]["reference_bytes"] > 0 and result["best"]["reference_s"] > 0


def test_cli_saves_a_plan_the_trainer_loads(tmp_path, capsys):
    from model.train.cli import load_plan

    saved = tmp_path / "plan.json"
    assert main(["--preset", "internvl3-8b", "--gpus", "64", "--results", str(tmp_path), "--save", str(saved)]) == 0
    assert f"plan written to {saved}" in capsys.readouterr().out
    plan = load_plan(str(saved))
    assert isinstance(plan, ParallelPlan) and plan.language.param_dtype == torch.bfloat16
    assert plan.to_dict() == json.loads(saved.read_text())


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "12"], "--gpus"),
    (["--gpus", "0"], "--gpus"),
    (["--gpu", "v100"], "--gpu"),
    (["--preset", "internvl3-3b"], "--preset"),
    (["--efficiency", "1.5"], "--efficiency"),
    (["--tokens-per-pack", "0"], "--tokens-per-pack"),
])
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


# ---- context parallelism


def test_context_parallel_by_hand():
    """cp = 2 over 4 GPUs: each GPU keeps half the pack's activations and does half its compute, the weights
    shard over dp_shard x cp, and its all-to-all traffic is the formula's, on the critical path."""
    shape, gpu = tiny_shape(), GPUS["h100"]
    workload = Workload(tokens_per_pack=40, tiles_per_pack=4, sample_length=10)
    whole = estimate(shape, plan_of("zero3", "zero3", "zero3"), 4, gpu, workload, Assumptions())
    split = estimate(shape, plan_of("zero3", "zero3", "zero3", cp=2), 4, gpu, workload, Assumptions())
    for name in ("vision", "projector", "language"):
        assert split.components[name].activations_bytes == pytest.approx(whole.components[name].activations_bytes / 2)
        assert split.components[name].compute_s == pytest.approx(whole.components[name].compute_s / 2)
        assert split.components[name].optimizer_bytes == whole.components[name].optimizer_bytes  # sharded over 4 either way
    # Per layer (2) and pass (forward, backward): q and output (4 heads) and k, v (2 heads, repeated to cp 2:
    # 2) of head dim 4 for the GPU's 20 tokens, half of it sent; plus the 4 image rows of 16, twice, half sent.
    expected = 2 * 2 * 20 * (2 * 4 + 2 * 2) * 4 * 2 * 0.5 + 2 * 4 * 1 * 16 * 2 * 0.5
    assert context_parallel_bytes(shape, plan_of("zero3", "zero3", "zero3", cp=2), workload) == expected
    assert split.context_parallel_s > 0 and whole.context_parallel_s == 0
    assert split.tokens_per_s_per_gpu == pytest.approx(40 / 2 / split.step_s)


def test_long_packs_of_8b_need_context_parallelism():
    """InternVL3-8B on 8 H100 with 128K-token packs: no plan without cp fits; the recommended one splits the
    pack (cp 2 or 4, as its 28 query and 4 key-value heads allow)."""
    shape = model_shape("internvl3-8b")
    workload = Workload(tokens_per_pack=131072, tiles_per_pack=128, sample_length=32768)
    best = recommend(shape, 8, GPUS["h100"], workload).best
    assert best is not None and best.plan.cp in (2, 4)
    without = [estimate(shape, dataclasses.replace(cost.plan, cp=1, dp_replicate=1), 8, GPUS["h100"], workload, Assumptions())
               for cost in [best]]
    assert not without[0].fits
    from internvl3_engine.planner.search import candidate_plans

    plans, _ = candidate_plans(shape, 8, GPUS["h100"])
    assert {plan.cp for plan in plans} == {1, 2, 4}  # 8 divides neither 28 heads nor is divided by 4 key-value heads
