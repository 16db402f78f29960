"""Smoke test of the benchmark harness: the tiny kernels and train suites on CPU, in-process (quick timing),
the FLOP formulas, and the baselines' agreement with the engine's reference. No assertions on speed."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import internvl3_engine
from internvl3_engine.dispatch import why_unusable
from internvl3_engine.ops.attention.blocks import parse_overrides

from bench import attention, attention_blocks, kernels, train
from bench.__main__ import main
from bench.attention import Segments
from bench.ceilings import datasheet_ceiling
from bench.harness import Timer, device_ms, gpu_busy_us

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One quick run of both suites at tiny sizes on CPU: (exit code, record, record path)."""
    out = tmp_path_factory.mktemp("bench")
    exit_code = main(["--suite", "all", "--sizes", "tiny", "--device", "cpu", "--quick", "--out", str(out)])
    (record_path,) = out.glob("*_all-tiny.json")
    return exit_code, json.loads(record_path.read_text()), record_path


def test_tiny_run_writes_a_complete_record(tiny_run):
    exit_code, record, record_path = tiny_run
    markdown = record_path.with_suffix(".md").read_text()
    assert "## Kernels" in markdown and "## Training step" in markdown
    for suffix in (".png", "_tflops.png"):
        assert record_path.with_name(record_path.stem + suffix).read_bytes().startswith(b"\x89PNG")
    assert record["schema"] == 2 and record["suites_run"] == ["kernels", "train"]
    assert record["ceilings"]["copy"]["gb_per_s"] > 0 and record["ceilings"]["matmul"]["tflop_per_s"] > 0
    assert record["ceilings"]["datasheet"] is None  # a CPU
    assert record["device"]["type"] == "cpu" and record["versions"]["internvl3_engine"]["version"]
    errors = [row for row in record["results"] + record["train"] if row["status"] == "error"]
    assert exit_code == (1 if errors else 0)  # a broken op is recorded and fails the run
    # Implementations that cannot run on this machine are listed once each, not as table rows of dashes.
    kernels_section = markdown.split("## Kernels")[1].split("## Training step")[0]
    skipped = [row for row in record["results"] if row["status"] == "skipped"]
    table_rows = [line for line in kernels_section.splitlines() if line.startswith("| ")][1:]
    assert len(table_rows) == len(record["results"]) - len(skipped)
    assert not skipped or f"Not run here ({len(skipped)} rows):" in kernels_section


def test_tiny_kernel_rows(tiny_run):
    _, record, _ = tiny_run
    rows = record["results"]
    assert {row["op"] for row in rows} == {spec.name for spec in kernels.OPS}
    for row in rows:
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] != "ok":
            assert row["reason"], row
            continue
        assert row["median_ms"] > 0, row
        # Memory-bound ops report bytes and GB/s, compute-bound ones FLOPs and TFLOP/s.
        assert (row.get("gb_per_s", 0) > 0 and row["bytes"] > 0) or (row.get("tflop_per_s", 0) > 0 and row["flops"] > 0), row
    # The reference runs every op the package exports, in every direction; the Triton interpreter too.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for row in rows:
        engine_row = row["implementation"] == "torch" or (interpreted and row["implementation"].startswith("triton"))
        if engine_row and hasattr(internvl3_engine, row["op"]):
            assert row["status"] == "ok", row
    differentiable = {spec.name for spec in kernels.OPS if spec.differentiable}
    assert {row["op"] for row in rows if row["direction"] == kernels.FORWARD_BACKWARD} == differentiable


def test_tiny_attention_and_cross_entropy_rows(tiny_run):
    _, record, _ = tiny_run
    rows = record["results"]
    status = {(row["op"], row["case"], row["direction"], row["implementation"]): row for row in rows}
    for case in attention.CASES["tiny"]:
        modes = ([f"triton[{mode}]" for mode in attention.ROTARY_MODES] if case.params["positions"] else ["triton"])
        for direction in (kernels.FORWARD, kernels.FORWARD_BACKWARD):
            names = {key[3] for key in status if key[:3] == ("v2pe_attention", case.label, direction)}
            assert names == {"torch", *modes, "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "flash-attn"}
            assert status[("v2pe_attention", case.label, direction, "sdpa-math")]["status"] == "ok"
            assert "GPU" in status[("v2pe_attention", case.label, direction, "flex")]["reason"]
            backward = status[("v2pe_attention", case.label, direction, "torch")]
            if direction == kernels.FORWARD_BACKWARD:
                assert backward["flops_backward"] > 0
    cross_entropy = [row for row in rows if row["op"] == "linear_cross_entropy"]
    assert {row["implementation"] for row in cross_entropy} == {
        "torch", "triton", "triton-recompute", "torch-linear+cross_entropy", "liger"
    }
    assert all(row["status"] == "ok" for row in cross_entropy if row["implementation"] == "torch-linear+cross_entropy")


def test_tiny_train_rows(tiny_run):
    _, record, _ = tiny_run
    ours, baseline = record["train"]
    assert ours["implementation"] == train.ENGINE_IMPLEMENTATION and ours["status"] == "ok", ours
    assert ours["preset"] == "tiny" and ours["median_step_ms"] > 0 and ours["tokens_per_s"] > 0
    flops = ours["model_flops"]
    parts = ("llm_matmuls", "llm_attention", "vit_matmuls", "vit_attention", "projector")
    assert flops["total"] == pytest.approx(sum(flops[part] for part in parts)) and min(flops[part] for part in parts) > 0
    assert ours["mfu_vs_matmul"] > 0 and ours["mfu_vs_datasheet"] is None and ours["padding_fraction"] == 0
    tokens = ours["params"]["tokens"]
    assert sum(ours["segment_lengths"]) == tokens

    assert baseline["implementation"] == train.TRANSFORMERS_IMPLEMENTATION and baseline["case"] == ours["case"]
    if baseline["status"] == "skipped":  # transformers is optional
        assert "transformers" in baseline["reason"] and ours["speedup_vs_transformers"] is None
        return
    assert baseline["status"] == "ok", baseline
    # Padded to the longest sample; tokens/s counts the real tokens only.
    samples, longest = baseline["padded_shape"]
    assert samples == ours["params"]["samples"] and longest == max(ours["segment_lengths"])
    assert baseline["padded_tokens"] == samples * longest > tokens
    assert baseline["padding_fraction"] == pytest.approx(1 - tokens / (samples * longest))
    assert baseline["tokens_per_s"] == pytest.approx(tokens / (baseline["median_step_ms"] * 1e-3))
    assert baseline["model_flops"] == flops
    assert ours["speedup_vs_transformers"] == pytest.approx(baseline["median_step_ms"] / ours["median_step_ms"])


def test_padded_batch_holds_the_same_samples_and_targets():
    from model import InternVL3Config

    config = InternVL3Config.preset("tiny")
    case = train.SIZES["tiny"][0]
    batch = train.make_batch(config, case, CPU, torch.float32, torch.Generator().manual_seed(3))
    padded = train.padded_batch(batch)
    lengths = batch["lengths"]
    assert padded["input_ids"].shape == padded["labels"].shape == (case.samples, max(lengths))
    assert padded["attention_mask"].sum(1).tolist() == lengths
    real = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][real], batch["input_ids"])  # row-major: the pack's order
    assert bool((padded["labels"][~real] == train.IGNORE_INDEX).all())
    # transformers' loss pairs position t with labels[t + 1]: shifted back, the labels are the pack's own.
    assert torch.equal(torch.cat([row[1:length] for row, length in zip(padded["labels"], lengths)]),
                       torch.cat([labels[:-1] for labels in batch["labels"].split(lengths)]))
    supervised = int((batch["labels"] != train.IGNORE_INDEX).sum())
    assert int((padded["labels"] != train.IGNORE_INDEX).sum()) == supervised > 0
    image_tokens = case.images * case.tiles_per_image * config.tokens_per_tile
    assert int((padded["input_ids"] == config.image_token_id).sum()) == image_tokens
    assert padded["pixel_values"] is batch["pixel_values"]


def test_transformers_baseline_computes_our_loss():
    """With our weights, transformers' InternVL on the padded batch gives our loss on the packed one: the
    baseline trains on the same samples and targets."""
    pytest.importorskip("transformers")
    from model import InternVL3, InternVL3Config

    config = InternVL3Config.preset("tiny")
    batch = train.make_batch(config, train.SIZES["tiny"][0], CPU, torch.float32, torch.Generator().manual_seed(4))
    ours = InternVL3(config)
    theirs = train.transformers_model(config, CPU, torch.float32, weights_of=ours)
    assert theirs.config._attn_implementation == "sdpa" and theirs.training
    expected = train.engine_loss(ours, batch)()
    torch.testing.assert_close(train.transformers_loss(theirs, train.padded_batch(batch))(), expected,
                               rtol=1e-5, atol=1e-6)


def test_real_sizes_on_cpu_skip_the_gpu_presets_and_print_how_to_publish(tmp_path, capsys):
    assert main(["--suite", "train", "--sizes", "real", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (record_path,) = tmp_path.glob("*_train-real.json")
    rows = json.loads(record_path.read_text())["train"]
    assert {row["preset"] for row in rows} == {"internvl3-1b", "internvl3-2b"}
    assert all(row["status"] == "skipped" and "GPU" in row["reason"] for row in rows)
    hint = capsys.readouterr().err
    assert "git add" in hint and record_path.name in hint and "bench/results/README.md" in hint


def test_unknown_op_is_refused(tmp_path):
    assert main(["--ops", "no_such_op", "--device", "cpu", "--out", str(tmp_path)]) == 2


# ---- formulas -------------------------------------------------------------------------------------------

def test_bytes_moved_formulas():
    generator = torch.Generator().manual_seed(0)
    args = kernels.ROTARY.make(CPU, torch.float32, generator, tokens=8, heads=2, head_dim=4)
    forward, backward = kernels.ROTARY.bytes_moved(args)
    assert forward == backward == 2 * (8 * 2 * 4) * 4 + 8 * 4 + 2 * 4  # x in and out, positions, inv_freq

    text, visual, is_visual = args = kernels.SCATTER_VISUAL.make(
        CPU, torch.float16, generator, tokens=32, channels=4, images=2, image_tokens=4
    )
    assert int(is_visual.sum()) == visual.shape[0] == 8
    forward, backward = kernels.SCATTER_VISUAL.bytes_moved(args)
    assert forward == 2 * (32 * 4) * 2 + 32  # kept text rows + visual rows in, every row out, the mask
    assert backward == 2 * (32 * 4) * 2 + (8 * 4) * 2 + 32  # grad in, grad_text and grad_visual out, the mask


def test_flop_formulas():
    q = torch.zeros(8, 4, 16)
    kv = torch.zeros(8, 2, 16)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    args = (q, kv, kv, cu_seqlens, 5, None)
    forward, backward = attention.attention_flops(args, causal=False)
    assert forward == 4 * (3**2 + 5**2) * 4 * 16 and backward == 2.5 * forward
    assert attention.attention_flops(args, causal=True) == (forward / 2, backward / 2)

    hidden, weight, labels = torch.zeros(6, 3), torch.zeros(10, 3), torch.zeros(6, dtype=torch.long)
    assert kernels.LINEAR_CROSS_ENTROPY.flops((hidden, weight, labels)) == (2 * 6 * 3 * 10, 4 * 6 * 3 * 10)


def test_model_flops_count_the_llm_without_its_embedding():
    from model import InternVL3, InternVL3Config

    model = InternVL3(InternVL3Config.preset("tiny"))
    case = train.SIZES["tiny"][0]
    flops = train.model_flops(model, case, [100, 28])
    language = sum(p.numel() for p in model.language.parameters()) - model.language.embed_tokens.weight.numel()
    assert flops["llm_matmuls"] == 6 * language * case.tokens
    text = model.config.text
    assert flops["llm_attention"] == 6 * text.num_layers * text.hidden_size * (100**2 + 28**2)


def test_datasheet_peaks_from_the_nvml_name():
    cuda = lambda name: {"type": "cuda", "name": name, "nvml_name": name}  # noqa: E731
    assert datasheet_ceiling(cuda("NVIDIA H100 80GB HBM3"))["tflop_per_s"] == 989
    assert datasheet_ceiling(cuda("NVIDIA H100 PCIe"))["tflop_per_s"] == 756
    assert datasheet_ceiling(cuda("NVIDIA H200"))["tflop_per_s"] == 989
    assert datasheet_ceiling(cuda("Some Future GPU")) is None
    assert datasheet_ceiling({"type": "cpu", "name": "Xeon"}) is None


# ---- inputs and baselines -------------------------------------------------------------------------------

def test_segment_mixes_and_equal_length_runs():
    generator = torch.Generator().manual_seed(0)
    lengths = attention.Segments(16384, 256, 4096).lengths(generator)
    assert sum(lengths) == 16384 and max(lengths) <= 4096 and min(lengths[:-1]) >= 256
    assert attention.Segments(4 * 9, 9, 9).lengths(generator) == [9] * 4
    cu_seqlens = torch.tensor([0, 9, 18, 27, 30, 32], dtype=torch.int32)
    assert attention._equal_length_runs((None, None, None, cu_seqlens), {}) == [(0, 3, 9), (27, 1, 3), (30, 1, 2)]


def test_v2pe_positions_restart_per_segment():
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    positions = attention._v2pe_positions(cu_seqlens, CPU, torch.Generator().manual_seed(0))
    assert positions.dtype == torch.float32 and positions[0] == 0 and positions[5] == 0
    steps = torch.diff(positions)
    assert bool(((steps == 1) | (steps == attention.V2PE_DELTA))[torch.arange(11) != 4].all())


@pytest.mark.parametrize("case", attention.CASES["tiny"], ids=lambda case: case.label)
def test_attention_baselines_match_the_reference(case):
    """Every implementation that runs here without the Triton interpreter computes the reference's result."""
    args = case.spec.make(CPU, torch.float32, torch.Generator().manual_seed(1), **case.params)
    with internvl3_engine.backend("torch"):
        expected = internvl3_engine.v2pe_attention(*args, **case.options)
    checked = []
    for implementation in case.spec.implementations(case):
        if implementation.name.startswith("triton") or implementation.unavailable(case, CPU, torch.float32):
            continue
        try:
            with implementation.selected():
                out = implementation.call(implementation.prepare(args, case.options), *args, **case.options)
        except RuntimeError:  # an SDPA backend that has no CPU kernel
            continue
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=implementation.name)
        checked.append(implementation.name)
    assert {"torch", "sdpa-math"} <= set(checked)


def test_cross_entropy_baseline_matches_the_engine():
    case = next(case for case in kernels.SIZES["tiny"] if case.spec is kernels.LINEAR_CROSS_ENTROPY)
    args = case.spec.make(CPU, torch.float32, torch.Generator().manual_seed(2), **case.params)
    by_name = {implementation.name: implementation for implementation in case.spec.implementations(case)}
    with by_name["torch"].selected():
        expected = by_name["torch"].call(None, *args)
    torch.testing.assert_close(by_name["torch-linear+cross_entropy"].call(None, *args), expected)


def test_quick_timer_times_one_call():
    calls = []
    assert Timer(CPU, quick=True).median_ms(lambda: calls.append(1)) >= 0
    assert calls == [1]


def test_device_time_sums_only_the_gpu_activities():
    from torch.autograd.profiler_util import FunctionEvent

    def event(start, end, device_type, name="e"):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device_type)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event(0, 100, cpu), event(10, 35, cuda, "_dq_kernel"), event(40, 47, cuda), event(50, 90, cpu, "_dq_kernel")]
    assert gpu_busy_us(events) == 32
    assert gpu_busy_us(events, kernel="_dq_kernel") == 25  # one kernel's own time (the attention block sweep)
    # Elsewhere than on CUDA there is no device time, and the callable is not run.
    assert device_ms(CPU, lambda: pytest.fail("ran")) is None


def test_attention_blocks_sweep_on_the_interpreter():
    # The sweep's machinery at a tiny size: each kernel's default and one candidate with unequal blocks run,
    # agree with the defaults' results, and the fastest come back as a valid override value.
    if why_unusable("triton", torch.device("cpu")) is not None:
        pytest.skip(why_unusable("triton", torch.device("cpu")))
    case = attention_blocks.SweepCase("tiny", Segments(40, 5, 17), 2, 1, 16, True, {
        "forward": ((32, 16, 1, 1),), "dkdv": ((16, 32, 1, 1),), "dq": ((32, 16, 1, 1),),
    }, rotary_mode="prerotate_k")
    rows = attention_blocks.sweep(case, torch.device("cpu"), torch.float32, calls=1)
    assert [(row["kernel"], tuple(row["config"]), row["default"]) for row in rows] == [
        ("forward", (16, 16, 1, 1), True), ("forward", (32, 16, 1, 1), False),
        ("dkdv", (16, 16, 1, 1), True), ("dkdv", (16, 32, 1, 1), False),
        ("dq", (16, 16, 1, 1), True), ("dq", (32, 16, 1, 1), False),
    ]
    for row in rows:
        assert "error" not in row and row["ms"] > 0 and row["disagreement"] < 1e-4, row
    value = attention_blocks.override_value(rows)
    assert set(parse_overrides(value)) == {("forward", 16), ("dkdv", 16), ("dq", 16)}
    assert "| tiny | dkdv | 16, 32, 1, 1 |" in attention_blocks.markdown(rows)


def test_attention_blocks_precompile_in_worker_processes():
    # The GPU sweep's compile stage, on the interpreter: every configuration runs in a spawned worker, and
    # one the kernels reject (a block larger than the kernels allow) comes back False instead of raising.
    if why_unusable("triton", torch.device("cpu")) is not None:
        pytest.skip(why_unusable("triton", torch.device("cpu")))
    case = attention_blocks.SweepCase("tiny", Segments(24, 5, 12), 2, 1, 16, False, {
        "forward": ((32, 16, 1, 1),), "dkdv": ((16, 512, 1, 1),), "dq": (),
    })
    assert attention_blocks.precompile(case, torch.device("cpu"), torch.float32, workers=2) == [True, True, True, False, True]


def test_attention_blocks_case_selection():
    assert attention_blocks._case_names(" LLM 7B,ViT ") == ["LLM 7B", "ViT"]
    for bad in ("LLM 8B", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="choose among"):
            attention_blocks._case_names(bad)


def test_start_benchmark_records_each_rank_at_each_world_size(tmp_path):
    """python -m bench.start on the tiny preset at W = 1 and 2: every rank's report (parameters held, peak
    and anonymous memory, start time, peak memory with the export), the export's time and bytes, the
    sharded parameters falling with W, a JSON record and a table."""
    import json

    from bench import start

    assert start.main(["--preset", "tiny", "--worlds", "1,2", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*_start-tiny.json")).read_text())
    one, two = record["rows"]
    assert [len(one["ranks"]), len(two["ranks"])] == [1, 2]
    for rank in one["ranks"] + two["ranks"]:
        assert rank["peak_host_bytes"] > 0 and rank["start_s"] > 0 and rank["anon_bytes"] > 0
        assert rank["export_peak_host_bytes"] >= rank["peak_host_bytes"]
    assert one["export_s"] > 0 and two["export_s"] > 0
    assert one["export_bytes"] == two["export_bytes"] == record["checkpoint_bytes"]
    whole = one["ranks"][0]["parameter_bytes"]
    assert sum(rank["parameter_bytes"] for rank in two["ranks"]) >= whole  # the replicated projector twice
    assert all(rank["parameter_bytes"] < 0.6 * whole for rank in two["ranks"])
    assert "| 2 |" in next(tmp_path.glob("*_start-tiny.md")).read_text()


def test_step_planning_benchmark_records_each_world_size(tmp_path):
    """python -m bench.step_planning at two small world sizes: per row the samples planned a step (growing
    with the ranks), plan_step's time and the wait with planning ahead, a JSON record and a table."""
    import json

    from bench import step_planning

    assert step_planning.main(["--worlds", "2,8", "--steps", "2", "--step-s", "0.05", "--records", "30", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*_step-planning.json")).read_text())
    small, large = record["rows"]
    assert [small["world"], large["world"]] == [2, 8] and 0 < small["samples_per_step"] < large["samples_per_step"]
    assert all(row["plan_s"] > 0 and row["wait_s"] >= 0 and row["added"] == row["wait_s"] / 0.05 for row in record["rows"])
    assert "| 8 |" in next(tmp_path.glob("*_step-planning.md")).read_text()


def test_clean_exit_benchmark_counts_the_launches_that_exited_0(tmp_path):
    """python -m bench.clean_exit, one launch of the W = 2 dry run: it exits 0 on every rank and the record
    says so."""
    import json

    from bench import clean_exit

    assert clean_exit.main(["--times", "1", "--cases", "dry-w2", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*_clean-exit.json")).read_text())
    assert [run["status"] for run in record["cases"]["dry-w2"]] == [0]
    assert "| dry-w2 | 1 | 1 | - |" in next(tmp_path.glob("*_clean-exit.md")).read_text()


def test_demo_learning_benchmark_trains_each_route_on_each_kind(tmp_path):
    """python -m bench.demo_learning on a small generated demo folder: the head, whole-model and
    head-then-model routes on an image question and the clips' question, each run's held-out curve within
    [0, 1] beside its chance."""
    import json

    from bench import demo_learning
    from model.train.demo_data import DemoDataConfig, generate

    data = tmp_path / "data"
    generate(str(data), seed=0, config=DemoDataConfig(train_images=6, eval_images=3, preference_pairs=1, train_videos=4, eval_videos=3))
    assert demo_learning.main(["--data", str(data), "--steps", "2", "--batch", "2", "--kinds", "count,motion", "--out", str(tmp_path),
                               "--routes", "head,model,head-then-model"]) == 0
    record = json.loads(next(tmp_path.glob("*_demo-learning.json")).read_text())
    assert [(run["route"], run["kind"]) for run in record["runs"]] == [(route, kind) for kind in ("count", "motion")
                                                                       for route in ("head", "model", "head-then-model")]
    for run in record["runs"]:
        assert [entry["step"] for entry in run["curve"]] == [1, 2] and all(0 <= entry["accuracy"] <= 1 for entry in run["curve"])
        assert run["chance"] == (0.25 if run["kind"] == "motion" else round(1 / 3, 4))
        assert run["views"] == (8 if run["route"] == "head-then-model" else 4)
    assert "| model | motion |" in next(tmp_path.glob("*_demo-learning.md")).read_text()
    with pytest.raises(SystemExit):
        demo_learning.main(["--kinds", "size"])


def test_video_decode_benchmark_times_both_clips(tmp_path):
    """python -m bench.video_decode at a tiny size: both clips' frames and times, their ratios, a JSON record and
    a table."""
    import json

    pytest.importorskip("av")
    from bench import video_decode

    assert video_decode.main(["--long-seconds", "4", "--short-seconds", "1", "--gop", "15", "--size", "32", "--quick",
                              "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*_video-decode.json")).read_text())
    long, short = record["clips"]
    assert (long["frames"], short["frames"], len(long["indices"])) == (120, 30, 8)
    assert all(clip["seek_ms"] > 0 and clip["in_order_ms"] > 0 for clip in record["clips"])
    assert record["ratio"] == long["seek_ms"] / short["seek_ms"]
    assert "| 4 s | 120 |" in next(tmp_path.glob("*_video-decode.md")).read_text()
    with pytest.raises(SystemExit):
        video_decode.main(["--short-seconds", "20", "--long-seconds", "10"])
