"""The bad-input sweep: every command (training, the model's convert and info, the planner, the engine's demo,
the benchmarks) fed the mistakes people make (missing files, malformed YAML and JSON, unknown settings at
every level, wrong types, impossible plans, empty and truncated data) ends with one line on stderr naming the
problem and a non-zero status, within a time limit (no hang), and no traceback. (A file truncated after some
good records trains on them and counts the cut record as bad: tests/model/test_trainer.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model.train.demo_data import DemoDataConfig, generate

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
TRAIN = [sys.executable, "-m", "model.train", "--preset", "tiny", "--max-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The inputs of the cases: generated demo data, and files each wrong in one way."""
    folder = tmp_path_factory.mktemp("bad_input")
    generate(str(folder / "data"), seed=0, config=DemoDataConfig(train_images=6, eval_images=1, preference_pairs=3, image_size=56,
                                                                  train_videos=0, eval_videos=0))
    data = folder / "data"
    meta = json.loads((data / "meta.json").read_text())
    first = next(iter(meta))

    def write(name: str, text: str) -> str:
        (folder / name).write_text(text)
        return str(folder / name)

    def meta_with(name: str, change) -> str:
        copy = json.loads(json.dumps(meta))
        for entry in copy.values():
            entry["annotation"] = str(data / entry["annotation"])
            if entry.get("root"):
                entry["root"] = str(data / entry["root"])
        change(copy)
        return write(name, json.dumps(copy))

    annotation = data / meta[first]["annotation"]
    lines = annotation.read_text().splitlines()
    return {
        "data": str(data / "meta.json"),
        "yaml_malformed": write("malformed.yaml", "optim: {lr: 1e-3\nmax_steps: [\n"),
        "json_malformed": write("malformed.json", '{"optim": {"lr": }'),
        "unknown_top": write("unknown_top.yaml", "max_stepz: 3\n"),
        "unknown_nested": write("unknown_nested.yaml", "optim: {lrr: 0.1}\n"),
        "unknown_model": write("unknown_model.yaml", "model: {text: {num_layerz: 2}}\n"),
        "wrong_type": write("wrong_type.yaml", "max_steps: ten\n"),
        "wrong_nested_type": write("wrong_nested_type.yaml", "optim: {lr: fast}\n"),
        "not_mapping": write("not_mapping.yaml", "- a\n- b\n"),
        "plan_malformed": write("plan_malformed.yaml", "vision: {sharding: zero3\n"),
        "plan_unknown": write("plan_unknown.yaml", "vision: {shardin: zero3}\n"),
        "plan_bad_value": write("plan_bad_value.yaml", "vision: {sharding: zero4}\n"),
        "plan_impossible": write("plan_impossible.yaml", "tp: 3\n"),
        "meta_malformed": write("meta_malformed.json", '{"text": {"annotation": '),
        "meta_misspelt": meta_with("meta_misspelt.json", lambda m: m[first].update(anotation=m[first].pop("annotation"))),
        "meta_unknown": meta_with("meta_unknown.json", lambda m: m[first].update(repeat_times=2)),
        "meta_wrong_type": meta_with("meta_wrong_type.json", lambda m: m[first].update(repeat_time="twice")),
        "meta_missing_annotation": meta_with("meta_missing_annotation.json", lambda m: m[first].update(annotation=str(folder / "absent.jsonl"))),
        "meta_empty_annotation": meta_with("meta_empty.json", lambda m: {name: m.pop(name) for name in list(m) if name != first}
                                           and m.update({first: {"annotation": write("empty.jsonl", "")}})),
        "meta_truncated": meta_with("meta_truncated.json", lambda m: m.clear() or m.update(
            {first: {"annotation": write("truncated.jsonl", lines[0][: len(lines[0]) // 2])}})),
        "meta_preference_only": str(data / "meta_mpo.json"),
        "meta_empty": write("meta_none.json", "{}"),
        "no_config": str(folder / "no-such.yaml"),
        "folder_without_config": str(tmp_path_factory.mktemp("empty_checkpoint")),
    }


def cases(files: dict) -> dict:
    """Each case's command line (with ``{output}``: a fresh output folder)."""
    train_with = lambda *flags: [*TRAIN, "--data", files["data"], "--output-dir", "{output}", *flags]  # noqa: E731
    return {
        "train: missing --config": train_with("--config", files["no_config"]),
        "train: malformed YAML config": train_with("--config", files["yaml_malformed"]),
        "train: malformed JSON config": train_with("--config", files["json_malformed"]),
        "train: unknown top-level setting": train_with("--config", files["unknown_top"]),
        "train: unknown section setting": train_with("--config", files["unknown_nested"]),
        "train: unknown model setting": train_with("--config", files["unknown_model"]),
        "train: wrong type": train_with("--config", files["wrong_type"]),
        "train: wrong type in a section": train_with("--config", files["wrong_nested_type"]),
        "train: config not a mapping": train_with("--config", files["not_mapping"]),
        "train: missing --plan": train_with("--plan", files["no_config"]),
        "train: malformed plan": train_with("--plan", files["plan_malformed"]),
        "train: unknown plan setting": train_with("--plan", files["plan_unknown"]),
        "train: bad plan value": train_with("--plan", files["plan_bad_value"]),
        "train: impossible plan": train_with("--plan", files["plan_impossible"]),
        "train: missing meta": [*TRAIN, "--data", files["no_config"], "--output-dir", "{output}"],
        "train: malformed meta": [*TRAIN, "--data", files["meta_malformed"], "--output-dir", "{output}"],
        "train: misspelt meta key": [*TRAIN, "--data", files["meta_misspelt"], "--output-dir", "{output}"],
        "train: unknown meta key": [*TRAIN, "--data", files["meta_unknown"], "--output-dir", "{output}"],
        "train: wrong meta type": [*TRAIN, "--data", files["meta_wrong_type"], "--output-dir", "{output}"],
        "train: missing annotation file": [*TRAIN, "--data", files["meta_missing_annotation"], "--output-dir", "{output}"],
        "train: empty annotation file": [*TRAIN, "--data", files["meta_empty_annotation"], "--output-dir", "{output}"],
        "train: annotation file truncated in its only record": [*TRAIN, "--data", files["meta_truncated"], "--output-dir", "{output}"],
        "train: preference data without --mode mpo": [*TRAIN, "--data", files["meta_preference_only"], "--output-dir", "{output}"],
        "train: empty meta": [*TRAIN, "--data", files["meta_empty"], "--output-dir", "{output}"],
        "train: missing --resume": train_with("--resume", files["no_config"]),
        "train: missing --init": train_with("--init", files["no_config"]),
        "train: --init without config.json": train_with("--init", files["folder_without_config"]),
        "train: negative --max-steps": train_with("--max-steps", "-1"),
        "train: unknown --log backend": train_with("--log", "mlflow"),
        "train: unknown flag": train_with("--learning-rate", "3"),
        "convert: missing source": [sys.executable, "-m", "model", "convert", files["no_config"], "{output}"],
        "convert: source without weights": [sys.executable, "-m", "model", "convert", files["folder_without_config"], "{output}"],
        "info: missing config": [sys.executable, "-m", "model", "info", "--config", files["no_config"]],
        "planner: missing --config": [sys.executable, "-m", "internvl3_engine.planner", "--config", files["no_config"]],
        "planner: malformed --config": [sys.executable, "-m", "internvl3_engine.planner", "--config", files["json_malformed"]],
        "planner: zero GPUs": [sys.executable, "-m", "internvl3_engine.planner", "--gpus", "0"],
        "demo: triton without a GPU or the interpreter": [sys.executable, "-m", "internvl3_engine", "demo", "--backend", "triton",
                                                          "--device", "cpu"],
        "demo: unknown backend": [sys.executable, "-m", "internvl3_engine", "demo", "--backend", "metal"],
        "bench: unknown suite": [sys.executable, "-m", "bench", "--suite", "nonsense"],
        "bench.start: bad worlds": [sys.executable, "-m", "bench.start", "--worlds", "0"],
    }


def _run(command: list, output: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "INTERNVL3_DEBUG")}
    try:
        return subprocess.run([part.replace("{output}", output) for part in command], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env={**environment, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, None, "", f"timed out after {TIMEOUT_S} s")


def test_every_command_ends_a_bad_input_with_one_line(files, tmp_path):
    table = cases(files)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(table, pool.map(lambda item: _run(item[1], str(tmp_path / f"out{item[0]}")), enumerate(table.values()))))
    failures = []
    for name, completed in results.items():
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        if completed.returncode is None:
            failures.append(f"{name}: hangs ({completed.stderr})")
        elif completed.returncode == 0:
            failures.append(f"{name}: exit status 0")
        elif len(lines) != 1 or "Traceback" in completed.stderr or ": error: " not in lines[0]:
            failures.append(f"{name}: exit {completed.returncode}, {len(lines)} lines on stderr: {completed.stderr[-600:]!r}")
        else:
            print(f"| {name} | {completed.returncode} | {lines[0]} |")  # the table (pytest -rP shows it)
    assert not failures, "\n".join(failures)
