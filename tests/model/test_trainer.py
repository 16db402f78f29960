"""The trainer (model/train/: cli, config, presets, trainer, optim, checkpointing, metrics, demo_data): demo data
generation, the command line, the nested config (flat settings named, each section's checks, what a run
stores), a short run whose loss falls, exact resume, the learning-rate schedule of a resume with more
steps, bad records, missing input files, skipped non-finite steps, MPO, freezing, activation
checkpointing, TensorBoard and Weights & Biases logging, the final transformers-layout weights."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from model.modeling import InternVL3
from model.train.checkpointing import list_checkpoints
from model.train.cli import build_parser, config_from_args, main
from model.train.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from model.data.video import read_video
from model.train.demo_data import DIRECTIONS, MOTION_QUESTION, DemoDataConfig, generate
from model.train.distributed import resolve_device
from model.train.metrics import MetricsLog, read_metrics
from model.train.optim import WarmupCosine, parameter_groups
from model.train.presets import preset_config
from model.train.trainer import Trainer

SMALL_DATA = DemoDataConfig(train_images=24, eval_images=4, preference_pairs=12, image_size=56, wide_fraction=0.25,
                            train_videos=6, eval_videos=2, clip_frames=6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_data")
    generate(str(folder), seed=0, config=SMALL_DATA)
    return folder


# The tiny preset (56-pixel tiles of 4 tokens) sized for the small generated data: a step takes ~0.1 s.
SMALL = {
    "model": {"preset": "tiny"},
    "cpu_threads": 1,
    "device": "cpu",  # gloo runs compare bit for bit with this one, also where a GPU is present
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"system_message": None, "max_packed_tokens": 512, "max_tiles": 16, "max_buffers": 3, "max_num": 2},
}


def small_config(data_dir, output_dir, **overrides) -> TrainConfig:
    """SMALL on the small generated data, then ``overrides`` (nested: a section changes the fields it names)."""
    settings = {
        **SMALL,
        "data": {**SMALL["data"], "path": str(data_dir / "meta.json")},
        "output_dir": str(output_dir),
        "max_steps": 6,
        "logging": {"log_every": 1, "eval_file": str(data_dir / "eval.jsonl")},
        "checkpoint": {"save_every": 100},
    }
    return TrainConfig().updated(settings).updated(overrides)


def test_device_setting(monkeypatch):
    with pytest.raises(ValueError, match="device must be one of"):
        TrainConfig(device="gpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="local rank 1 has no GPU: this node has 1"):
        resolve_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)


def run(config, **kwargs):
    return Trainer(config, show_progress=False, echo=lambda message: None, **kwargs).train()


# ---- demo data and command line


def test_demo_data_generation_is_deterministic(tmp_path):
    tiny = DemoDataConfig(train_images=6, eval_images=2, preference_pairs=3, image_size=56, train_videos=2, eval_videos=1, clip_frames=5)
    first, second = tmp_path / "a", tmp_path / "b"
    generate(str(first), seed=3, config=tiny)
    generate(str(second), seed=3, config=tiny)
    names = sorted(os.listdir(first)) + [f"{media}/{name}" for media in ("images", "videos") for name in sorted(os.listdir(first / media))]
    assert "meta.json" in names and "images/train_00000.png" in names and "videos/train_00001.mp4" in names
    for media in ("images", "videos"):
        assert sorted(os.listdir(first / media)) == sorted(os.listdir(second / media))
    for name in names:
        if os.path.isfile(first / name):
            assert filecmp.cmp(first / name, second / name, shallow=False), name
    other = tmp_path / "c"
    generate(str(other), seed=4, config=tiny)
    assert not filecmp.cmp(first / "shapes.jsonl", other / "shapes.jsonl", shallow=False)
    meta = json.loads((first / "meta.json").read_text())
    assert set(meta) == {"demo_shapes", "demo_motion", "demo_corpus"}


def test_demo_clips_move_the_way_their_answer_says(data_dir):
    """In every clip the shape's centre (its saturated pixels) travels clip_travel image sides between the
    first and the last frame, in the direction the answer names, and stays put across the other axis."""
    records = [json.loads(line) for line in (data_dir / "motion.jsonl").read_text().splitlines()]
    assert len(records) == SMALL_DATA.train_videos and len({record["video"] for record in records}) == len(records)
    directions = set()
    for record in records:
        question, answer = record["conversations"]
        assert question["value"] == f"<video>\n{MOTION_QUESTION[0]}" and answer["value"] in DIRECTIONS
        direction = answer["value"]
        frames = read_video(str(data_dir / record["video"]), SMALL_DATA.clip_frames)
        assert len(frames) == SMALL_DATA.clip_frames

        def centre(frame):
            pixels = np.asarray(frame, dtype=np.float32)
            ys, xs = np.nonzero(pixels.max(-1) - pixels.min(-1) > 80)  # coloured, not the grey background
            return np.array([xs.mean(), ys.mean()])

        moved = (centre(frames[-1]) - centre(frames[0])) / SMALL_DATA.image_size
        expected = np.array(DIRECTIONS[direction]) * SMALL_DATA.clip_travel
        assert np.abs(moved - expected).max() < 0.08, (record["video"], direction, moved)
        directions.add(direction)
    assert len(directions) >= 3  # the seeded draws cover the directions


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_cli_reads_config_files_and_flags_win(tmp_path, suffix):
    path = tmp_path / f"run.{suffix}"
    if suffix == "yaml":
        path.write_text("optim: {lr: 1.5e-4, freeze_vision: true}\nmax_steps: 77\nmodel:\n  text: {num_layers: 5}\n")
    else:
        path.write_text(json.dumps({"optim": {"lr": 1.5e-4, "freeze_vision": True}, "max_steps": 77, "model": {"text": {"num_layers": 5}}}))
    args = build_parser().parse_args(["--preset", "demo", "--config", str(path), "--max-steps", "9", "--seed", "4", "--output-dir", str(tmp_path / "o")])
    config = config_from_args(args)
    assert (config.optim.lr, config.max_steps, config.seed, config.optim.freeze_vision) == (1.5e-4, 9, 4, True)
    assert config.model_config().text.num_layers == 5
    assert config.model_config().text.hidden_size == 128  # the demo's other settings stay
    assert config.output_dir == str(tmp_path / "o")
    path.write_text("{\"learning_rate\": 1}" if suffix == "json" else "learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config fields"):
        config_from_args(build_parser().parse_args(["--config", str(path)]))


def test_cli_mode_defaults_and_presets():
    mpo = config_from_args(build_parser().parse_args(["--preset", "demo", "--mode", "mpo"]))
    assert mpo.mode == "mpo" and mpo.max_steps < 100 and mpo.output_dir == "runs/demo-mpo"
    real = config_from_args(build_parser().parse_args(["--preset", "internvl3-1b", "--mode", "sft"]))
    assert real.model_config().vision.image_size == 448 and real.data.max_num == 12
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mode", "dpo"])


def test_log_setting_from_the_config_file_and_the_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("logging: {log: [tensorboard]}\n")

    def log_of(*flags):
        return config_from_args(build_parser().parse_args(["--config", str(path), *flags])).logging.log

    assert TrainConfig().logging.log == ()  # metrics.jsonl only
    assert log_of() == ("tensorboard",)
    assert log_of("--log", "wandb, tensorboard") == ("wandb", "tensorboard")
    assert log_of("--log", "none") == ()
    with pytest.raises(ValueError, match=r"log: unknown backends \['tensorbored'\]"):
        LoggingConfig(log="tensorboard,tensorbored")
    with pytest.raises(TypeError, match="log: a comma-separated string or a list"):
        LoggingConfig(log=3)


# ---- the nested config


def test_a_flat_setting_is_an_error_naming_its_section(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"moved into sections: lr is optim\.lr, save_every is checkpoint\.save_every, mpo_beta is mpo\.beta"):
        TrainConfig().updated({"lr": 1e-5, "save_every": 3, "mpo_beta": 0.2})
    with pytest.raises(ValueError, match=r"data: a mapping of the data section's fields, got 'meta\.json' \(data is data\.path\)"):
        TrainConfig().updated({"data": "meta.json"})
    with pytest.raises(ValueError, match=r"unknown optim fields \['max_steps'\] \(max_steps is a top-level setting\)"):
        TrainConfig().updated({"optim": {"max_steps": 3}})
    with pytest.raises(ValueError, match=r"unknown logging fields \['save_every'\] \(save_every is checkpoint\.save_every\)"):
        TrainConfig().updated({"logging": {"save_every": 3}})
    path = tmp_path / "old.yaml"
    path.write_text("lr: 1.0e-5\nmax_steps: 5\nlog_every: 2\n")
    assert main(["--config", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"python -m model.train: error: {path}: config settings moved into sections: lr is optim.lr, "
                                       "log_every is logging.log_every (a config file nests them: optim: {lr: 1.0e-5})\n")


@pytest.mark.parametrize("settings, message", [
    ({"max_steps": -1}, "max_steps must be >= 0, got -1"),
    ({"autocast_dtype": "int8"}, "autocast_dtype must be a torch floating dtype's name, got 'int8'"),
    ({"cpu_threads": 0}, "cpu_threads must be >= 1 or None (torch's default), got 0"),
    ({"optim": {"lr": -1.0}}, "optim.lr must be > 0, got -1.0"),
    ({"optim": {"lr_vision": 0.0}}, "optim.lr_vision must be > 0 or None (the lr), got 0.0"),
    ({"optim": {"betas": [0.9]}}, "optim.betas must be two numbers in [0, 1), got (0.9,)"),
    ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps must be >= 0, got -1"),
    ({"optim": {"min_lr_ratio": 2}}, "optim.min_lr_ratio must be in [0, 1], got 2"),
    ({"optim": {"grad_clip": 0}}, "optim.grad_clip must be > 0, got 0"),
    ({"data": {"overlong": "wrap"}}, "data: overlong must be one of"),
    ({"data": {"max_packed_tokens": 1}}, "data: max_packed_tokens must be at least 2, got 1"),
    ({"data": {"min_num": 3, "max_num": 2}}, "data: "),
    ({"data": {"language_weight": -1}}, "data.language_weight must be >= 0, got -1"),
    ({"mpo": {"beta": 0}}, "mpo.beta must be > 0, got 0"),
    ({"mpo": {"weights": [1, 1]}}, "mpo.weights must be three numbers >= 0 (preference, quality, generation), got (1, 1)"),
    ({"logging": {"log_every": 0}}, "logging.log_every must be >= 1, got 0"),
    ({"logging": {"eval_examples": 0}}, "logging.eval_examples must be >= 1 or None (all), got 0"),
    ({"logging": {"eval_delta": 0}}, "logging.eval_delta must be in (0, 1], got 0"),
    ({"checkpoint": {"save_every": 0}}, "checkpoint.save_every must be >= 1, got 0"),
    ({"checkpoint": {"keep_last": -1}}, "checkpoint.keep_last must be >= 0, got -1"),
])
def test_each_section_checks_its_fields(settings, message):
    with pytest.raises(ValueError) as caught:
        TrainConfig().updated(settings)
    assert str(caught.value).startswith(message)


def test_sections_are_built_from_mappings_and_presets_merge_section_by_section():
    assert TrainConfig(optim={"lr": 1e-4}).optim == OptimConfig(lr=1e-4)
    with pytest.raises(ValueError, match="checkpoint.keep_last must be >= 0"):
        CheckpointConfig(keep_last=-2)
    demo, mpo, sft = preset_config("demo"), preset_config("demo", "mpo"), preset_config("demo", "sft")
    assert (mpo.optim.lr, mpo.optim.warmup_steps, mpo.checkpoint.save_every, mpo.max_steps) == (2e-4, 5, 30, 60)
    assert mpo.optim.betas == demo.optim.betas == (0.9, 0.95) and mpo.checkpoint.keep_last == 2 and mpo.logging.log == ("tensorboard",)
    assert (sft.data.language_weight, sft.data.max_num, demo.data.language_weight) == (0.0, 2, 1.0)
    assert preset_config("internvl3-1b", "mpo").optim.lr == TrainConfig().optim.lr / 4


def test_train_config_json_and_the_checkpoint_hold_the_nested_config_it_resumes_from(data_dir, tmp_path):
    config = small_config(data_dir, tmp_path / "full", max_steps=2, checkpoint={"save_every": 1})
    full = run(config)
    saved = json.loads((tmp_path / "full" / "train_config.json").read_text())["train"]
    assert saved["optim"]["lr"] == 3e-3 and saved["checkpoint"] == {"save_every": 1, "keep_last": 2, "asynchronous": True} and "lr" not in saved
    assert TrainConfig(**saved) == config
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000001"
    assert TrainConfig(**torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)["config"]) == config
    again = TrainConfig(**saved).updated({"output_dir": str(tmp_path / "again")})
    assert run(again, resume=str(checkpoint)).losses == full.losses[1:]


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.55)
    assert schedule(14) == pytest.approx(0.1) and schedule(20) == pytest.approx(0.1)


def test_parameter_groups_freeze_and_component_lr():
    model = InternVL3(TrainConfig().model_config())
    components = model.engine_components()
    components["vision"].requires_grad_(False)
    groups = parameter_groups(components, 1e-3, 0.1, {"projector": 5e-3})
    assert {g["component"] for g in groups} == {"projector", "language"}
    assert all(g["lr"] == (5e-3 if g["component"] == "projector" else 1e-3) for g in groups)
    assert all(g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0) for g in groups)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    assert trainable == model.num_parameters()["projector"] + model.num_parameters()["language"]


# ---- training runs


def test_short_run_through_the_cli_loss_falls_and_writes_everything(data_dir, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: {preset: tiny}\ncpu_threads: 1\noptim: {lr: 3.0e-3, warmup_steps: 2}\n"
        "data: {system_message: null, max_packed_tokens: 512, max_tiles: 16, max_buffers: 3, max_num: 2}\n"
        f"logging: {{eval_file: {data_dir / 'eval.jsonl'}}}\n"
    )
    output = tmp_path / "run"
    code = main(["--preset", "tiny", "--config", str(config_file), "--data", str(data_dir / "meta.json"), "--output-dir", str(output),
                 "--max-steps", "24", "--save-every", "8", "--keep-last", "2", "--log-every", "1", "--no-progress"])
    assert code == 0
    steps = [entry for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry]
    assert [entry["step"] for entry in steps] == list(range(1, 25))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(entry) for entry in steps)
    losses = [entry["loss"] for entry in steps]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert [step for step, _ in list_checkpoints(str(output))] == [16, 24]  # the last two of 8, 16, 24
    assert (output / "loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "chance" in printed and "data errors: none" in printed
    evaluation = [entry for entry in read_metrics(str(output / "metrics.jsonl")) if entry.get("event") == "eval"][-1]
    assert set(evaluation["per_kind"]) == {"color", "shape", "count", "motion"}  # the clips' question too
    assert evaluation["per_kind"]["motion"] == {"accuracy": evaluation["per_kind"]["motion"]["accuracy"], "chance": 0.25, "questions": 2}
    # The final weights load back (transformers layout) and equal the trained model's last checkpoint.
    loaded = InternVL3.from_pretrained(str(output / "final"))
    state = torch.load(output / "checkpoints" / "step_00000024" / "trainer.pt", map_location="cpu", weights_only=False)["model"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_the_demo_writes_tensorboard_events(data_dir, tmp_path):
    """The demo preset (the main job) logs to TensorBoard beside metrics.jsonl: its event file, read back with
    tensorboard's reader, holds the JSONL's values."""
    output = tmp_path / "demo"
    code = main(["--preset", "demo", "--data", str(data_dir / "meta.json"), "--output-dir", str(output), "--max-steps", "2",
                 "--log-every", "1", "--no-progress"])
    assert code == 0
    expected = jsonl_scalars(output / "metrics.jsonl")
    assert [step for step, _ in expected["train/loss"]] == [1, 2] and "train/data_wait_s" in expected
    assert tensorboard_scalars(output / "tensorboard") == as_float32(expected)


def test_an_asynchronous_checkpoint_holds_the_state_at_its_step_and_appears_once_complete(tmp_path, monkeypatch):
    """CheckpointWriter(asynchronous=True): save returns while the writer thread still writes; the parameters
    changed right after do not reach the checkpoint; the folder appears only when complete (wait), and a
    writer that fails leaves no folder."""
    import threading

    from model.train.checkpointing import CheckpointWriter

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    release, real_save = threading.Event(), torch.save

    def slow_save(*args, **kwargs):
        release.wait(timeout=60)
        real_save(*args, **kwargs)

    synchronous = CheckpointWriter(str(tmp_path / "sync"), sharded=False, keep_last=2, asynchronous=False)
    assert os.path.isfile(os.path.join(synchronous.save(1, {"step": 1}, model, optimizer), "trainer.pt"))
    monkeypatch.setattr(torch, "save", slow_save)
    writer = CheckpointWriter(str(tmp_path), sharded=False, keep_last=2, asynchronous=True)
    final = writer.save(5, {"step": 5}, model, optimizer)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on
    assert not os.path.exists(final) and os.path.isdir(final + ".tmp") and list_checkpoints(str(tmp_path)) == []
    release.set()
    writer.wait()
    state = torch.load(os.path.join(final, "trainer.pt"), weights_only=False)
    assert state["step"] == 5 and all(torch.equal(state["model"][name], value) for name, value in saved.items())

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    writer.save(6, {"step": 6}, model, optimizer)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [5]


@pytest.mark.parametrize("mode,frames", [("pretrain", {}), ("mpo", {}),
                                         ("pretrain", {"video_min_frames": 2, "video_frames": 5, "video_frame_offsets": "random"})],
                         ids=["pretrain", "mpo", "pretrain-drawn-frames"])
def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(data_dir, tmp_path, mode, frames):
    data = str(data_dir / ("meta_mpo.json" if mode == "mpo" else "meta.json"))
    settings = {"mode": mode, "data": {"path": data, **frames}, "max_steps": 8, "checkpoint": {"save_every": 4}, "grad_accum": 2}
    full = run(small_config(data_dir, tmp_path / "full", **settings))
    assert all(loss is not None and math.isfinite(loss) for loss in full.losses)
    assert not full.data_errors  # the planned video shapes are those decoded
    halfway = dict(list_checkpoints(str(tmp_path / "full")))[4]
    resumed = run(small_config(data_dir, tmp_path / "resumed", **settings), resume=halfway)
    assert resumed.losses == full.losses[4:]
    # "auto" finds the latest checkpoint of the output dir: nothing left to do after step 8.
    again = run(small_config(data_dir, tmp_path / "full", **settings), resume="auto")
    assert again.losses == []


def step_values(output_dir, name: str) -> dict:
    """{step: the metrics.jsonl value of ``name``} over the step lines."""
    return {entry["step"]: entry[name] for entry in read_metrics(str(output_dir / "metrics.jsonl")) if "event" not in entry}


def test_resume_with_more_steps_follows_the_new_schedule(data_dir, tmp_path):
    """A 3-step run resumed to 6 steps takes the lr of a 6-step run at steps 4-6 (past the 2 warmup steps:
    on the cosine to step 6), not the floor where the 3-step schedule ended."""
    run(small_config(data_dir, tmp_path / "full", max_steps=6))
    run(small_config(data_dir, tmp_path / "short", max_steps=3, checkpoint={"save_every": 3}))
    resumed = small_config(data_dir, tmp_path / "short", max_steps=6)
    run(resumed, resume="auto")
    expected, got = step_values(tmp_path / "full", "lr"), step_values(tmp_path / "short", "lr")
    assert [got[step] for step in (4, 5, 6)] == [expected[step] for step in (4, 5, 6)]
    assert got[4] > got[5] > got[6] > resumed.optim.min_lr_ratio * resumed.optim.lr


def test_bad_records_are_skipped_reported_and_the_run_goes_on(data_dir, tmp_path):
    records = (data_dir / "shapes.jsonl").read_text().splitlines()[:8]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    bad = [
        "{this is not json",
        json.dumps({"image": "images/does_not_exist.png", "conversations": json.loads(records[0])["conversations"]}),
        json.dumps({"image": "broken.png", "conversations": json.loads(records[1])["conversations"]}),
        json.dumps({"conversations": [{"from": "human", "value": "no answer"}]}),
    ]
    lines = records[:3] + bad + records[3:]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    os.symlink(data_dir / "images", tmp_path / "images")
    (tmp_path / "meta.json").write_text(json.dumps({"mixed": {"root": ".", "annotation": "mixed.jsonl"}}))
    messages = []
    config = small_config(data_dir, tmp_path / "out", data={"path": str(tmp_path / "meta.json")}, max_steps=4)
    result = Trainer(config, show_progress=False, echo=messages.append).train()
    assert len(result.losses) == 4 and all(math.isfinite(loss) for loss in result.losses)
    # Each bad record counts once, though the small file wraps around and is read several times.
    assert result.data_errors.total == 4 < result.data_errors.occurrences
    lines_reported = {line for file, line, _ in result.data_errors.examples if file.endswith("mixed.jsonl")}
    assert {4, 5, 6, 7} <= lines_reported
    text = "\n".join(messages)
    assert "mixed.jsonl:4: malformed JSON" in text and "missing image" in text and "corrupt image" in text
    summary = [entry for entry in read_metrics(str(tmp_path / "out" / "metrics.jsonl")) if entry.get("event") == "summary"][0]
    assert summary["data_errors"]["total"] == result.data_errors.total


def _meta_with_annotation(tmp_path, data_dir, annotation: str) -> str:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"shapes": {"root": str(data_dir), "annotation": annotation}}))
    return str(path)


@pytest.mark.parametrize("missing", ["meta", "annotation", "eval_file"])
def test_a_missing_input_file_is_named_before_anything_is_built(data_dir, tmp_path, missing):
    gone = str(tmp_path / "gone.jsonl")
    meta = _meta_with_annotation(tmp_path, data_dir, "gone.jsonl")
    overrides, message = {
        "meta": ({"data": {"path": gone}}, f"data (the meta file): no such file {gone}"),
        "annotation": ({"data": {"path": meta}}, f"{meta}: dataset 'shapes': annotation: no such file {gone}"),
        "eval_file": ({"logging": {"eval_file": gone}}, f"eval_file: no such file {gone}"),
    }[missing]
    with pytest.raises(FileNotFoundError) as caught:
        Trainer(small_config(data_dir, tmp_path / "out", **overrides), show_progress=False, echo=lambda message: None)
    assert str(caught.value) == message


def test_cli_ends_with_one_line_for_a_missing_file_a_bad_setting_or_a_missing_package(data_dir, tmp_path, capsys, monkeypatch):
    base = ["--preset", "tiny", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    meta = _meta_with_annotation(tmp_path, data_dir, "gone.jsonl")
    assert main(base + ["--data", meta]) == 2
    error = capsys.readouterr().err
    assert error == f"python -m model.train: error: {meta}: dataset 'shapes': annotation: no such file {tmp_path / 'gone.jsonl'}\n"
    assert main(base + ["--data", meta, "--log", "tensorbored"]) == 2
    assert capsys.readouterr().err == ("python -m model.train: error: log: unknown backends ['tensorbored']; "
                                       "choose from ['tensorboard', 'wandb'] (metrics.jsonl is always written)\n")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    assert main(base + ["--data", str(data_dir / "meta.json"), "--log", "tensorboard,wandb"]) == 2
    assert capsys.readouterr().err == "python -m model.train: error: --log wandb needs the wandb package: pip install wandb\n"
    assert main(base + ["--data", str(data_dir / "meta.json"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (f"python -m model.train: error: --resume {tmp_path / 'nowhere'}: not a checkpoint "
                                       "folder (no trainer.pt)\n")


# The scheduler warns that optimizer.step was replaced: that is this test's counting wrapper.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_non_finite_loss_skips_the_step(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data_dir, tmp_path, max_steps=4), show_progress=False, echo=lambda message: None)
    original = trainer._lm_step
    calls = {"lm": 0, "optimizer": 0}

    def poisoned(batches):
        calls["lm"] += 1
        loss, parts = original(batches)
        return (loss * float("nan") if calls["lm"] == 2 else loss), parts

    optimizer_step = trainer.optimizer.step

    def counted_step(*args, **kwargs):
        calls["optimizer"] += 1
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "_lm_step", poisoned)
    monkeypatch.setattr(trainer.optimizer, "step", counted_step)
    result = trainer.train()
    assert result.skipped_steps == [2] and result.losses[1] is None
    assert calls["optimizer"] == 3
    events = [entry for entry in read_metrics(str(tmp_path / "metrics.jsonl")) if entry.get("event") == "skipped_step"]
    assert [event["step"] for event in events] == [2]


def test_frozen_vision_stays_put_and_activation_checkpointing_keeps_the_losses(data_dir, tmp_path):
    plain = Trainer(small_config(data_dir, tmp_path / "a", max_steps=3, optim={"freeze_vision": True}), show_progress=False, echo=lambda m: None)
    before = {name: value.clone() for name, value in plain.model.state_dict().items()}
    losses = plain.train().losses
    after = plain.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("vision."))
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("projector."))
    checkpointed = run(small_config(data_dir, tmp_path / "b", max_steps=3, optim={"freeze_vision": True}, activation_checkpointing=True))
    assert checkpointed.losses == pytest.approx(losses, rel=1e-5)


def test_mpo_mode_trains_on_preference_pairs(data_dir, tmp_path):
    config = small_config(data_dir, tmp_path, mode="mpo", data={"path": str(data_dir / "meta_mpo.json")}, max_steps=3, optim={"lr": 1e-3})
    result = run(config)
    assert all(math.isfinite(loss) for loss in result.losses)
    steps = [entry for entry in read_metrics(str(tmp_path / "metrics.jsonl")) if "event" not in entry]
    assert {"preference", "quality", "nll", "reward_accuracy", "reward_shift"} <= set(steps[0])
    # At step 1 the policy is the reference: every log-ratio is 0, the preference term is log 2.
    assert steps[0]["preference"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="preference"):
        Trainer(small_config(data_dir, tmp_path / "x", mode="mpo"), show_progress=False, echo=lambda m: None)


def test_mpo_reads_precomputed_reference_log_probabilities_from_the_records(data_dir, tmp_path):
    """Preference records all carrying ref_chosen_logp / ref_rejected_logp: no reference model is built and
    the step's preference term is computed against those values (here the chosen one far below the
    rejected one, so the log-ratio margin is large: the term is far from the log 2 of a reference equal to
    the policy). One record without them: the reference model again."""
    lines = (data_dir / "preference.jsonl").read_text().splitlines()
    records = [{**json.loads(line), "ref_chosen_logp": -400.0, "ref_rejected_logp": -1.0} for line in lines]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "preference.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    meta = {"pref": {"annotation": "preference.jsonl", "root": str(data_dir), "kind": "preference"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    config = small_config(data_dir, tmp_path / "run", mode="mpo", data={"path": str(folder / "meta.json")}, max_steps=2, optim={"lr": 1e-3})
    trainer = Trainer(config, show_progress=False, echo=lambda m: None)
    assert trainer.precomputed and trainer.reference is None
    trainer.train()
    steps = [entry for entry in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "event" not in entry]
    assert all(math.isfinite(entry["loss"]) for entry in steps) and steps[0]["preference"] < 0.01
    del records[3]["ref_rejected_logp"]
    (folder / "preference.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    again = Trainer(small_config(data_dir, tmp_path / "again", mode="mpo", data={"path": str(folder / "meta.json")}),
                    show_progress=False, echo=lambda m: None)
    assert not again.precomputed and again.reference is not None


# ---- TensorBoard and Weights & Biases


def jsonl_scalars(metrics_path) -> dict:
    """{tag: [(step, value)]} that the backends should hold: every number of a step line but its step as
    train/<name>, the eval event's accuracy as eval/accuracy and per kind as eval/<kind>/accuracy."""
    expected: dict = {}
    for entry in read_metrics(str(metrics_path)):
        if "event" not in entry:
            numbers = {f"train/{name}": value for name, value in entry.items() if name != "step" and isinstance(value, (int, float))}
        elif entry["event"] == "eval":
            numbers = {"eval/accuracy": entry["accuracy"]}
            numbers.update({f"eval/{kind}/accuracy": values["accuracy"] for kind, values in entry["per_kind"].items()})
        else:
            continue
        for tag, value in numbers.items():
            expected.setdefault(tag, []).append((entry["step"], value))
    return expected


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value)]} as TensorBoard reads the event files of ``folder`` (after the purges of resumes)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def as_float32(scalars: dict) -> dict:
    """TensorBoard stores float32 values."""
    return {tag: [(step, float(np.float32(value))) for step, value in points] for tag, points in scalars.items()}


def test_tensorboard_holds_the_jsonl_values_once_per_step_across_a_resume(data_dir, tmp_path):
    """A 4-step run, then a resume from its step-2 checkpoint that logs steps 3 and 4 again (other step
    times): TensorBoard shows each step once, with the values of metrics.jsonl (which the resume rewrote)."""
    config = small_config(data_dir, tmp_path, max_steps=4, checkpoint={"save_every": 2}, logging={"log": ["tensorboard"]})
    run(config)
    run(config, resume=str(tmp_path / "checkpoints" / "step_00000002"))
    expected = jsonl_scalars(tmp_path / "metrics.jsonl")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/data_wait_s", "eval/accuracy"} <= set(expected)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4] and expected["eval/accuracy"][0][0] == 4
    assert tensorboard_scalars(tmp_path / "tensorboard") == as_float32(expected)


def test_metrics_log_passes_every_number_of_a_step_line_and_the_accuracies(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def open(self, first_step):
            self.calls.append(("open", first_step))

        def write(self, step, scalars):
            self.calls.append(("write", step, scalars))

        def close(self):
            self.calls.append(("close",))

    sink = Recorder()
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), resume_step=6, sinks=[sink])
    log.write({"step": 7, "loss": 1.5, "mfu": 0.4, "imbalance": 1.02, "imbalance_naive": 1.3, "tokens": 9})
    log.write({"event": "skipped_step", "step": 8, "loss": float("nan")})
    log.write({"event": "eval", "step": 9, "accuracy": 0.5, "chance": 0.25, "questions": 4,
               "per_kind": {"colour": {"accuracy": 1.0, "chance": 0.25, "questions": 2}}})
    log.close()
    assert sink.calls == [
        ("open", 7),
        ("write", 7, {"train/loss": 1.5, "train/mfu": 0.4, "train/imbalance": 1.02, "train/imbalance_naive": 1.3, "train/tokens": 9.0}),
        ("write", 9, {"eval/accuracy": 0.5, "eval/colour/accuracy": 1.0}),
        ("close",),
    ]
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 3
    silent = Recorder()
    MetricsLog(str(tmp_path / "other.jsonl"), enabled=False, sinks=[silent]).write({"step": 1, "loss": 1.0})
    assert silent.calls == []  # ranks other than 0 write nothing


def test_wandb_gets_the_jsonl_values_when_asked_for(data_dir, tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**settings):
        calls.append(("init", settings))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = small_config(data_dir, tmp_path, max_steps=2, logging={"log": "wandb"})
    run(config)
    (kind, settings), *logs, last = calls
    assert (kind, settings, last) == ("init", {"dir": str(tmp_path), "config": dataclasses.asdict(config)}, ("finish",))
    logged: dict = {}
    for _, step, data in logs:
        for tag, value in data.items():
            logged.setdefault(tag, []).append((step, value))
    assert logged == jsonl_scalars(tmp_path / "metrics.jsonl")


def test_a_plan_runs_in_one_process_without_torchrun(data_dir, tmp_path, monkeypatch):
    """A ParallelPlan without torchrun: a one-process group on an in-memory store (no port: runs side by side
    cannot collide), with the plain run's losses and gradient norms."""
    import torch.distributed as dist
    from internvl3_engine.parallel import ParallelPlan

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    plain = run(small_config(data_dir, tmp_path / "plain", max_steps=2))
    try:
        run(small_config(data_dir, tmp_path / "planned", max_steps=2), plan=ParallelPlan())
        assert dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(plain.losses) == 2
    assert_steps_match(single_metrics(tmp_path / "planned"), single_metrics(tmp_path / "plain"))


def _torchrun_train(data_dir, tmp_path, plan_text: str, output, *arguments, ranks: int = 2, settings=None):
    _torchrun(data_dir, tmp_path, plan_text, output, *arguments, ranks=ranks, settings=settings)
    return [entry for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry]


def _torchrun(data_dir, tmp_path, plan_text: str, output, *arguments, ranks: int = 2, settings=None):
    """python -m model.train on ``ranks`` gloo ranks (torchrun) with the small settings (and ``settings``'
    top-level fields); returns the completed process."""
    import subprocess
    import sys

    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({**SMALL, "data": {**SMALL["data"], "path": str(data_dir / "meta.json")}, **(settings or {})}))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan_text)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone", "-m", "model.train",
               "--preset", "tiny", "--config", str(config_file), "--plan", str(plan_file), "--output-dir", str(output),
               "--log-every", "1", "--no-progress", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def single_metrics(output) -> list[dict]:
    return [entry for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry]


# Equal losses cannot show a gradient scaled by a constant factor (a missing or doubled divisor): the clipping
# at every step (the tiny model's gradient norms are 2-4 against a clip of 1.0) and AdamW undo it, so the
# runs compare their pre-clip gradient norms too. Those of a distributed run and of one process differ by the
# float32 summation order only: a few 1e-7 relative in these tests.
GRAD_NORM_RTOL = 1e-5


def assert_steps_match(entries: list[dict], expected: list[dict]) -> None:
    """The metrics.jsonl step lines ``entries`` hold the steps of ``expected`` (another run's) with the same
    losses (relative 1e-5) and pre-clip gradient norms (relative GRAD_NORM_RTOL)."""
    assert [entry["step"] for entry in entries] == [entry["step"] for entry in expected]
    assert [entry["loss"] for entry in entries] == pytest.approx([entry["loss"] for entry in expected], rel=1e-5)
    assert [entry["grad_norm"] for entry in entries] == pytest.approx([entry["grad_norm"] for entry in expected], rel=GRAD_NORM_RTOL)


def _init_checkpoint(folder) -> dict:
    """A tiny InternVL3 (the small settings' model) with random weights, saved in the transformers layout."""
    from model import InternVL3Config
    from model.weights import read_tensors

    torch.manual_seed(1)
    model = InternVL3(InternVL3Config.preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)
    return dict(read_tensors(folder))


def test_sharded_start_dry_run_reports_each_rank_and_exports_the_checkpoint(data_dir, tmp_path):
    """--init under a plan with --max-steps 0: each rank builds on the meta device, reads only its shards,
    reports its memory and takes no step; --export writes the input checkpoint's tensors back exactly."""
    from model.weights import read_tensors

    original = _init_checkpoint(tmp_path / "init")
    completed = _torchrun(data_dir, tmp_path, "language: {sharding: zero3}\nvision: {sharding: zero3}\n", tmp_path / "out",
                          "--init", str(tmp_path / "init"), "--max-steps", "0", "--export", str(tmp_path / "export"))
    printed = completed.stdout + completed.stderr
    assert "rank 0: parameters" in printed and "rank 1: parameters" in printed and "no step taken" in printed
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()
    exported = dict(read_tensors(tmp_path / "export"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("plan", ["language: {sharding: zero3}\nvision: {sharding: zero3}\n", "language: {sharding: zero3}\ntp: 2\n"])
def test_a_sharded_start_from_scratch_initialises_as_one_process(data_dir, tmp_path, plan):
    """Without --init under a plan, each rank materialises and initialises only its shards (FSDP2 shards,
    tensor-parallel slices): the exported weights equal the single process's initialisation exactly."""
    from model.weights import read_tensors

    completed = _torchrun(data_dir, tmp_path, plan, tmp_path / "out", "--max-steps", "0", "--export", str(tmp_path / "export"))
    assert "no step taken" in completed.stdout + completed.stderr
    config = small_config(data_dir, tmp_path / "single")
    single = InternVL3(config.model_config(), init_seed=config.seed)
    exported = dict(read_tensors(tmp_path / "export"))
    expected = dict(read_tensors(_saved(single, tmp_path / "single")))
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["pretrain", "mpo"])
@pytest.mark.parametrize("plan", ["{}\n", "cp: 2\n"])
def test_sharded_start_trains_as_one_process(data_dir, tmp_path, mode, plan):
    """From --init under a plan (the sharded start; in MPO the reference policy sharded the same way), 2 ranks
    give the losses and gradient norms of one process accumulating their 2 packs from the same checkpoint, or with cp 2 (each
    pack split over the two ranks, MPO's response sums gathered over them) of one process on one pack a step
    (MPO: its reward shift is the same whatever the world size; at step 1 the sharded reference equals the
    policy, preference log 2)."""
    _init_checkpoint(tmp_path / "init")
    data = str(data_dir / ("meta_mpo.json" if mode == "mpo" else "meta.json"))
    entries = _torchrun_train(data_dir, tmp_path, plan, tmp_path / "ranks", "--init", str(tmp_path / "init"),
                              "--max-steps", "2", "--mode", mode, "--data", data)
    packs = 1 if "cp" in plan else 2
    run(small_config(data_dir, tmp_path / "single", init=str(tmp_path / "init"), max_steps=2, grad_accum=packs, mode=mode, data={"path": data}))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    if mode == "mpo":
        assert entries[0]["preference"] == pytest.approx(math.log(2), abs=1e-5)
        assert entries[1]["reward_shift"] == pytest.approx(single[1]["reward_shift"], rel=1e-5, abs=1e-9)


# Each component under each sharding over the three modes.
FOUR_RANK_PLANS = {
    "pretrain": "vision: {sharding: zero3}\nprojector: {sharding: zero2}\nlanguage: {sharding: replicate}\n",
    "sft": "vision: {sharding: replicate}\nprojector: {sharding: zero3}\nlanguage: {sharding: zero2}\n",
    "mpo": "vision: {sharding: zero2}\nprojector: {sharding: replicate}\nlanguage: {sharding: zero3}\n",
}


@pytest.mark.parametrize("mode", ["pretrain", "sft", "mpo"])
def test_four_ranks_from_a_sharded_start_train_as_one_process(data_dir, tmp_path, mode):
    """W = 4 from --init (the sharded start) gives the losses and gradient norms of one process accumulating the
    4 packs, in every mode; in pretraining, its checkpoint of step 2 resumes at W = 2 (accumulating 2) to step 3's."""
    _init_checkpoint(tmp_path / "init")
    data = str(data_dir / ("meta_mpo.json" if mode == "mpo" else "meta.json"))
    steps = 3 if mode == "pretrain" else 2
    output = tmp_path / "ranks"
    entries = _torchrun_train(data_dir, tmp_path, FOUR_RANK_PLANS[mode], output, "--init", str(tmp_path / "init"),
                              "--max-steps", str(steps), "--save-every", "2", "--mode", mode, "--data", data, ranks=4)
    run(small_config(data_dir, tmp_path / "single", init=str(tmp_path / "init"), max_steps=steps, grad_accum=4, mode=mode, data={"path": data}))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    assert entries[-1]["images_decoded"] == single[-1]["images_decoded"]
    if mode == "pretrain":
        resumed = _torchrun_train(data_dir, tmp_path, FOUR_RANK_PLANS[mode], tmp_path / "two", "--init", str(tmp_path / "init"),
                                  "--max-steps", "3", "--resume", str(output / "checkpoints" / "step_00000002"),
                                  settings={"grad_accum": 2})
        assert_steps_match(resumed, single[2:])


@pytest.mark.parametrize("ranks, packs, plan", [
    (2, 1, "cp: 2\n"),
    (4, 2, "cp: 2\nvision: {sharding: zero3}\nlanguage: {sharding: zero2, activation_checkpointing: true}\n"),
    (4, 1, "cp: 4\nvision: {sharding: replicate}\nprojector: {sharding: zero3}\nlanguage: {sharding: replicate}\n"),
    (4, 1, "cp: 2\ntp: 2\n"),
    (4, 2, "cp: 2\ndp_replicate: 2\n"),
    (2, 1, "cp: 2\nlanguage: {sharding: zero3, compile: true}\n"),
])
def test_context_parallel_plans_train_as_one_process(data_dir, tmp_path, ranks, packs, plan):
    """cp splits each pack's tokens over its ranks: alone (cp 2, cp 4 with the other component shardings),
    beside data-parallel ranks, tensor parallelism, HSDP, activation checkpointing and compiled blocks; the losses and gradient
    norms are those of one process accumulating the step's ``packs`` packs; a checkpoint of cp = 2 resumes at cp = 1."""
    output = tmp_path / "ranks"
    entries = _torchrun_train(data_dir, tmp_path, plan, output, "--max-steps", "3", "--save-every", "2", ranks=ranks)
    run(small_config(data_dir, tmp_path / "single", max_steps=3, grad_accum=packs))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    if plan == "cp: 2\n":
        resumed = _torchrun_train(data_dir, tmp_path, "{}\n", tmp_path / "resumed", "--max-steps", "3",
                                  "--resume", str(output / "checkpoints" / "step_00000002"), ranks=1)
        assert_steps_match(resumed, single[2:])


def test_context_parallel_peers_decode_each_pack_once(data_dir, tmp_path):
    """cp 2 accumulating two packs a step: each peer decodes one of them and sends it to the other
    (model.data.PackDecoder's peers); the losses and gradient norms are one process's accumulating the two, and the ranks
    together decode the images it did."""
    output = tmp_path / "ranks"
    entries = _torchrun_train(data_dir, tmp_path, "cp: 2\n", output, "--max-steps", "3", settings={"grad_accum": 2})
    run(small_config(data_dir, tmp_path / "single", max_steps=3, grad_accum=2))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    assert entries[-1]["images_decoded"] == single[-1]["images_decoded"] > 0


def test_two_process_plan_matches_one_process_with_accumulation(data_dir, tmp_path):
    """torchrun with 2 gloo ranks under a ParallelPlan: the balancer shares each step's two packs between the
    ranks, so a step sees the same two packs as one process accumulating 2, and the square-averaged loss
    through data_parallel_loss and its gradient norm are the same numbers (up to float summation order). The
    balance is logged."""
    output = tmp_path / "ranks"
    entries = _torchrun_train(data_dir, tmp_path, "vision: {sharding: zero2}\nprojector: {sharding: replicate}\nlanguage: {sharding: zero3}\n",
                              output, "--max-steps", "3", "--save-every", "3")
    assert all(1.0 <= entry["imbalance"] <= entry["imbalance_naive"] + 1e-9 for entry in entries)
    run(small_config(data_dir, tmp_path / "single", max_steps=3, grad_accum=2))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    assert (output / "checkpoints" / "step_00000003" / "model").is_dir()
    assert (output / "final" / "config.json").is_file()
    # Each rank decoded only its own packs: the two together decoded the images one process did.
    assert entries[-1]["images_decoded"] == single[-1]["images_decoded"] > 0


def test_a_checkpoint_of_two_ranks_resumes_in_one_process(data_dir, tmp_path, monkeypatch):
    """The data position is the same on every rank and at every world size: a plan's checkpoint of step 3
    written by 2 ranks resumes under a one-process plan (accumulating the 2 packs) to the losses and gradient
    norms of one process run through (the 2 ranks' steps too)."""
    import torch.distributed as dist
    from internvl3_engine.parallel import ParallelPlan

    plan = "vision: {sharding: zero3}\nlanguage: {sharding: zero3}\n"
    _torchrun_train(data_dir, tmp_path, plan, tmp_path / "ranks", "--max-steps", "3", "--save-every", "3")
    run(small_config(data_dir, tmp_path / "straight", max_steps=5, grad_accum=2))
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    try:
        resumed = run(small_config(data_dir, tmp_path / "ranks", max_steps=5, grad_accum=2),
                      plan=ParallelPlan.from_dict({"vision": {"sharding": "zero3"}, "language": {"sharding": "zero3"}}),
                      resume=str(tmp_path / "ranks" / "checkpoints" / "step_00000003"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(resumed.losses) == 2
    # metrics.jsonl of the output folder: steps 1-3 of the two ranks, then 4-5 of the resumed process.
    assert_steps_match(single_metrics(tmp_path / "ranks"), single_metrics(tmp_path / "straight"))


def test_tensor_parallel_plan_matches_one_process_and_resumes_from_its_sharded_checkpoint(data_dir, tmp_path):
    """tp = 2 over 2 ranks: one data-parallel rank, the LLM's linears split between the two; the losses and
    gradient norms are one process's. Resuming under the plan from the sharded checkpoint of step 2 (into
    another folder) gives steps 3 and 4 again."""
    output = tmp_path / "ranks"
    plan = "language: {sharding: zero3}\ntp: 2\n"
    entries = _torchrun_train(data_dir, tmp_path, plan, output, "--max-steps", "4", "--save-every", "2")
    run(small_config(data_dir, tmp_path / "single", max_steps=4))
    single = single_metrics(tmp_path / "single")
    assert_steps_match(entries, single)
    assert all("imbalance" not in entry for entry in entries)  # one data-parallel rank: nothing to balance
    resumed = _torchrun_train(data_dir, tmp_path, plan, tmp_path / "resumed", "--max-steps", "4", "--resume",
                              str(output / "checkpoints" / "step_00000002"))
    assert_steps_match(resumed, single[2:])


@pytest.mark.parametrize("plan, world, mode, message", [
    ("tp: 4\n", "2", "pretrain", "dp_replicate * cp * tp = 1 * 1 * 4 must divide the world size 2"),
    ("cp: 3\n", "3", "pretrain", "context parallel degree 3 must divide the query heads (4)"),
])
def test_a_plan_the_run_cannot_hold_is_refused_with_the_reason_before_anything_is_built(data_dir, tmp_path, capsys, monkeypatch,
                                                                                      plan, world, mode, message):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan)
    monkeypatch.setenv("WORLD_SIZE", world)
    code = main(["--preset", "tiny", "--data", str(data_dir / "meta.json"), "--plan", str(plan_file), "--mode", mode,
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "out").exists()
