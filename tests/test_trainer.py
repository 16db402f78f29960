"""The trainer (model/train.py, trainer.py, optim.py, checkpointing.py, metrics.py, demo_data.py): demo data
generation, the command line, a short run whose loss falls, exact resume, bad records, skipped non-finite
steps, MPO, freezing, activation checkpointing, the final transformers-layout weights."""

from __future__ import annotations

import filecmp
import json
import math
import os

import pytest
import torch

from model.checkpointing import list_checkpoints
from model.demo_data import DemoDataConfig, generate
from model.metrics import read_metrics
from model.modeling import InternVL3
from model.optim import WarmupCosine, parameter_groups
from model.train import build_parser, config_from_args, main
from model.trainer import Trainer, TrainConfig, resolve_device

SMALL_DATA = DemoDataConfig(train_images=24, eval_images=4, preference_pairs=12, image_size=56, wide_fraction=0.25)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_data")
    generate(str(folder), seed=0, config=SMALL_DATA)
    return folder


def small_config(data_dir, output_dir, **overrides) -> TrainConfig:
    """The tiny preset (56-pixel tiles of 4 tokens) on the small generated data: a step takes ~0.1 s."""
    settings = {
        "model": {"preset": "tiny"},
        "data": str(data_dir / "meta.json"),
        "eval_file": str(data_dir / "eval.jsonl"),
        "system_message": None,
        "output_dir": str(output_dir),
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 2,
        "max_packed_tokens": 512,
        "max_tiles": 16,
        "max_buffers": 3,
        "max_num": 2,
        "log_every": 1,
        "save_every": 100,
        "cpu_threads": 1,
        "device": "cpu",  # gloo runs compare bit for bit with this one, also where a GPU is present
    }
    settings.update(overrides)
    return TrainConfig().updated(settings)


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
    tiny = DemoDataConfig(train_images=6, eval_images=2, preference_pairs=3, image_size=56)
    first, second = tmp_path / "a", tmp_path / "b"
    generate(str(first), seed=3, config=tiny)
    generate(str(second), seed=3, config=tiny)
    names = sorted(os.listdir(first)) + [f"images/{name}" for name in sorted(os.listdir(first / "images"))]
    assert "meta.json" in names and "images/train_00000.png" in names
    assert sorted(os.listdir(first / "images")) == sorted(os.listdir(second / "images"))
    for name in names:
        if os.path.isfile(first / name):
            assert filecmp.cmp(first / name, second / name, shallow=False), name
    other = tmp_path / "c"
    generate(str(other), seed=4, config=tiny)
    assert not filecmp.cmp(first / "shapes.jsonl", other / "shapes.jsonl", shallow=False)
    meta = json.loads((first / "meta.json").read_text())
    assert set(meta) == {"demo_shapes", "demo_corpus"}


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_cli_reads_config_files_and_flags_win(tmp_path, suffix):
    path = tmp_path / f"run.{suffix}"
    if suffix == "yaml":
        path.write_text("lr: 1.5e-4\nmax_steps: 77\nfreeze_vision: true\nmodel:\n  text: {num_layers: 5}\n")
    else:
        path.write_text(json.dumps({"lr": 1.5e-4, "max_steps": 77, "freeze_vision": True, "model": {"text": {"num_layers": 5}}}))
    args = build_parser().parse_args(["--preset", "demo", "--config", str(path), "--max-steps", "9", "--seed", "4", "--output-dir", str(tmp_path / "o")])
    config = config_from_args(args)
    assert (config.lr, config.max_steps, config.seed, config.freeze_vision) == (1.5e-4, 9, 4, True)
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
    assert real.model_config().vision.image_size == 448 and real.max_num == 12
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mode", "dpo"])


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
        "model: {preset: tiny}\nsystem_message: null\nlr: 3.0e-3\nwarmup_steps: 2\nmax_packed_tokens: 512\n"
        f"max_tiles: 16\nmax_buffers: 3\nmax_num: 2\ncpu_threads: 1\neval_file: {data_dir / 'eval.jsonl'}\n"
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
    # The final weights load back (transformers layout) and equal the trained model's last checkpoint.
    loaded = InternVL3.from_pretrained(str(output / "final"))
    state = torch.load(output / "checkpoints" / "step_00000024" / "trainer.pt", map_location="cpu", weights_only=False)["model"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("mode", ["pretrain", "mpo"])
def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(data_dir, tmp_path, mode):
    data = str(data_dir / ("meta_mpo.json" if mode == "mpo" else "meta.json"))
    full = run(small_config(data_dir, tmp_path / "full", mode=mode, data=data, max_steps=8, save_every=4, grad_accum=2))
    assert all(loss is not None and math.isfinite(loss) for loss in full.losses)
    halfway = dict(list_checkpoints(str(tmp_path / "full")))[4]
    resumed = run(small_config(data_dir, tmp_path / "resumed", mode=mode, data=data, max_steps=8, save_every=4, grad_accum=2), resume=halfway)
    assert resumed.losses == full.losses[4:]
    # "auto" finds the latest checkpoint of the output dir: nothing left to do after step 8.
    again = run(small_config(data_dir, tmp_path / "full", mode=mode, data=data, max_steps=8, save_every=4, grad_accum=2), resume="auto")
    assert again.losses == []


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
    config = small_config(data_dir, tmp_path / "out", data=str(tmp_path / "meta.json"), max_steps=4)
    result = Trainer(config, show_progress=False, echo=messages.append).train()
    assert len(result.losses) == 4 and all(math.isfinite(loss) for loss in result.losses)
    assert result.data_errors.total >= 4
    lines_reported = {line for file, line, _ in result.data_errors.examples if file.endswith("mixed.jsonl")}
    assert {4, 5, 6, 7} <= lines_reported
    text = "\n".join(messages)
    assert "mixed.jsonl:4: malformed JSON" in text and "missing image" in text and "corrupt image" in text
    summary = [entry for entry in read_metrics(str(tmp_path / "out" / "metrics.jsonl")) if entry.get("event") == "summary"][0]
    assert summary["data_errors"]["total"] == result.data_errors.total


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
    plain = Trainer(small_config(data_dir, tmp_path / "a", max_steps=3, freeze_vision=True), show_progress=False, echo=lambda m: None)
    before = {name: value.clone() for name, value in plain.model.state_dict().items()}
    losses = plain.train().losses
    after = plain.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("vision."))
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("projector."))
    checkpointed = run(small_config(data_dir, tmp_path / "b", max_steps=3, freeze_vision=True, activation_checkpointing=True))
    assert checkpointed.losses == pytest.approx(losses, rel=1e-5)


def test_mpo_mode_trains_on_preference_pairs(data_dir, tmp_path):
    config = small_config(data_dir, tmp_path, mode="mpo", data=str(data_dir / "meta_mpo.json"), max_steps=3, lr=1e-3)
    result = run(config)
    assert all(math.isfinite(loss) for loss in result.losses)
    steps = [entry for entry in read_metrics(str(tmp_path / "metrics.jsonl")) if "event" not in entry]
    assert {"preference", "quality", "nll", "reward_accuracy", "reward_shift"} <= set(steps[0])
    # At step 1 the policy is the reference: every log-ratio is 0, the preference term is log 2.
    assert steps[0]["preference"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="preference"):
        Trainer(small_config(data_dir, tmp_path / "x", mode="mpo"), show_progress=False, echo=lambda m: None)


def _torchrun_train(data_dir, tmp_path, plan_text: str, output, *arguments):
    import subprocess
    import sys

    config_file = tmp_path / "run.json"
    settings = {key: value for key, value in small_config(data_dir, tmp_path / "unused").__dict__.items()
                if key in ("model", "data", "system_message", "lr", "warmup_steps", "max_packed_tokens", "max_tiles", "max_buffers", "max_num", "cpu_threads", "device")}
    config_file.write_text(json.dumps(settings))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan_text)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631", "-m", "model.train",
               "--preset", "tiny", "--config", str(config_file), "--plan", str(plan_file), "--output-dir", str(output),
               "--log-every", "1", "--no-progress", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return [entry for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry]


def test_two_process_plan_matches_one_process_with_accumulation(data_dir, tmp_path):
    """torchrun with 2 gloo ranks under a ParallelPlan: the balancer shares each step's two packs between the
    ranks, so a step sees the same two packs as one process accumulating 2, and the square-averaged loss
    through data_parallel_loss is the same number (up to float summation order). The balance is logged."""
    output = tmp_path / "ranks"
    entries = _torchrun_train(data_dir, tmp_path, "vision: {sharding: zero2}\nprojector: {sharding: replicate}\nlanguage: {sharding: zero3}\n",
                              output, "--max-steps", "3", "--save-every", "3")
    distributed = [entry["loss"] for entry in entries]
    assert all(1.0 <= entry["imbalance"] <= entry["imbalance_naive"] + 1e-9 for entry in entries)
    single = run(small_config(data_dir, tmp_path / "single", max_steps=3, grad_accum=2)).losses
    assert distributed == pytest.approx(single, rel=1e-5)
    assert (output / "checkpoints" / "step_00000003" / "model").is_dir()
    assert (output / "final" / "config.json").is_file()


def test_tensor_parallel_plan_matches_one_process_and_resumes_from_its_sharded_checkpoint(data_dir, tmp_path):
    """tp = 2 over 2 ranks: one data-parallel rank, the LLM's linears split between the two; the losses are
    one process's. Resuming under the plan from the sharded checkpoint of step 2 gives step 3 again."""
    output = tmp_path / "ranks"
    plan = "language: {sharding: zero3}\ntp: 2\n"
    entries = _torchrun_train(data_dir, tmp_path, plan, output, "--max-steps", "3", "--save-every", "2")
    single = run(small_config(data_dir, tmp_path / "single", max_steps=3)).losses
    assert [entry["loss"] for entry in entries] == pytest.approx(single, rel=1e-5)
    assert all("imbalance" not in entry for entry in entries)  # one data-parallel rank: nothing to balance
    resumed = _torchrun_train(data_dir, tmp_path, plan, output, "--max-steps", "3", "--resume",
                              str(output / "checkpoints" / "step_00000002"))
    assert [entry["loss"] for entry in resumed] == [entry["loss"] for entry in entries]
