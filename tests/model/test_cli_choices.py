"""No silent choice in `python -m model.train`: the start-up line says where the weights come from (a fresh
initialisation and its seed, --init's folder, or the checkpoint resumed); --init and an explicit --preset
agree or the command stops; a resume past --max-steps stops; the demo's MPO says which weights it starts
from; a dry run prints no learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from model import InternVL3, InternVL3Config
from model.train.cli import main
from model.train.demo_data import generate
from test_trainer import SMALL_DATA


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cli_data")
    generate(str(folder), seed=0, config=SMALL_DATA)
    return str(folder / "meta.json")


def _train(meta: str, output, *flags) -> int:
    return main(["--preset", "tiny", "--data", meta, "--output-dir", str(output), "--no-progress", "--log-every", "1", *flags])


def test_the_start_says_where_the_weights_come_from_and_a_resume_past_max_steps_stops(meta, tmp_path, capsys):
    assert _train(meta, tmp_path / "run", "--max-steps", "2", "--seed", "5") == 0
    assert "weights initialised from seed 5" in capsys.readouterr().out
    assert _train(meta, tmp_path / "run", "--max-steps", "3", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "weights of " in out and "step_00000002 (step 2)" in out
    assert _train(meta, tmp_path / "run", "--max-steps", "2", "--resume", "auto") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "at step 3, past max_steps 2" in error


def test_init_and_an_explicit_preset_must_agree(meta, tmp_path, capsys):
    torch.manual_seed(0)
    InternVL3(InternVL3Config.preset("tiny")).save_pretrained(str(tmp_path / "tiny"))
    assert _train(meta, tmp_path / "agree", "--max-steps", "0", "--init", str(tmp_path / "tiny")) == 0
    assert f"weights from {tmp_path / 'tiny'}" in capsys.readouterr().out
    code = main(["--preset", "internvl3-1b", "--data", meta, "--output-dir", str(tmp_path / "differ"), "--max-steps", "0",
                 "--init", str(tmp_path / "tiny")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "not --preset internvl3-1b's architecture" in error
    # Without --preset the weights' config.json sets the model, and the start-up line says so.
    assert main(["--data", meta, "--output-dir", str(tmp_path / "implied"), "--max-steps", "0", "--init", str(tmp_path / "tiny")]) == 0
    assert f"weights from {tmp_path / 'tiny'}" in capsys.readouterr().out


def test_the_demo_mpo_says_which_weights_it_starts_from(tmp_path, capsys, monkeypatch):
    from model.train.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    config = config_from_args(build_parser().parse_args(["--mode", "mpo", "--output-dir", str(tmp_path / "elsewhere" / "mpo")]))
    assert config.init is None and "MPO starts from a fresh initialisation" in capsys.readouterr().out
    torch.manual_seed(0)
    demo = tmp_path / "runs" / "demo" / "final"
    InternVL3(config.model_config()).save_pretrained(str(demo))
    config = config_from_args(build_parser().parse_args(["--mode", "mpo", "--output-dir", str(tmp_path / "elsewhere" / "mpo")]))
    assert config.init == "runs/demo/final" and "pre-trained demo's weights: runs/demo/final" in capsys.readouterr().out


def test_a_dry_run_resuming_prints_no_schedule(meta, tmp_path, capsys):
    assert _train(meta, tmp_path / "run", "--max-steps", "2") == 0
    capsys.readouterr()
    assert _train(meta, tmp_path / "run", "--max-steps", "0", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "learning-rate schedule" not in out
