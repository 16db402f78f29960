"""Train InternVL3: ``python -m model.train --preset demo`` (the main job), or a model preset on your data.

    python -m model.train --preset demo                      tiny InternVL3 on the generated demo data
    python -m model.train --preset demo --mode mpo           MPO on the demo's preference pairs (starts
                                                             from runs/demo/final when it exists)
    python -m model.train --preset internvl3-1b --config run.yaml --data meta.json --mode sft
    torchrun --nproc_per_node 8 -m model.train --preset internvl3-8b --plan plan.yaml --data meta.json
    tensorboard --logdir runs/demo/tensorboard               the demo's curves (it logs to TensorBoard)

--config: a YAML or JSON mapping of TrainConfig settings, nested by section (model/train/config.py), e.g.
    max_steps: 2000
    model: {text: {num_layers: 4}}
    optim: {lr: 1.0e-5, lr_vision: 2.0e-6, freeze_language: true}
    data: {max_packed_tokens: 4096, tokenizer: path/to/tokenizer}
    logging: {log: [tensorboard], eval_file: eval.jsonl}
    checkpoint: {save_every: 200}
  Sections: optim (lr, weight_decay, schedule, freezing), data (meta file, tokenizer, packing, tiling,
  mixing), mpo (beta, weights), logging (log_every, log, eval_file), checkpoint (save_every, keep_last); the
  run's own settings (mode, model, init, output_dir, seed, max_steps, grad_accum, device, ...) at the top.
  A flat setting of the old layout is an error naming its place: "lr is optim.lr".
--plan: a YAML or JSON ParallelPlan: {vision: {sharding: zero2, param_dtype: bfloat16, activation_checkpointing: true},
    projector: {sharding: replicate}, language: {sharding: zero3}, dp_replicate: 1, prefetch: 1}
--log: metric backends beside <output-dir>/metrics.jsonl (always written): tensorboard (event files in
    <output-dir>/tensorboard; needs the tensorboard package), wandb (a Weights & Biases run; needs wandb,
    configured by its own environment: WANDB_PROJECT, WANDB_MODE=offline, ...), or both comma-separated:
    --log tensorboard,wandb; "none": metrics.jsonl only (the default; the demo preset logs to tensorboard). In a config file: logging: {log: [tensorboard]}.
    Logged: loss, lr, grad_norm, tokens_per_s, data_wait_s, mfu (CUDA), imbalance (under a plan), the other
    numbers of each metrics line, and the final evaluation's accuracy.
--resume with a larger --max-steps than the checkpoint's run: the learning-rate schedule is this run's (the
    cosine runs to the new --max-steps, as in a run started with it).
SIGTERM (preemption, scancel): the run finishes the step it is taking, checkpoints it, publishes it and exits
    with status 143; --resume auto continues from it. A background checkpoint is published (renamed into
    place) at the first step end where every rank has finished writing it; a new run removes the
    unpublished ones a crash left.
--max-steps 0: a dry run: build the model, load --init, shard it under the plan (and restore --resume), print
    each rank's memory, take no step. Under a plan, --init's checkpoint (transformers layout) is read
    shard by shard: each rank holds and reads only its part (model.weights.load_weights_distributed).
--export DIR: after the run (or the dry run), write the model's weights to DIR in the transformers layout,
    from the shards under a plan (no rank gathers the model); e.g. a checkpoint as a model folder:
    torchrun ... -m model.train --plan plan.yaml --resume CKPT --max-steps 0 --export OUT
Flags given on the command line win over the config file, which wins over the preset. They set --data
data.path, --save-every checkpoint.save_every, --keep-last checkpoint.keep_last, --log-every
logging.log_every, --log logging.log, and the others their namesakes at the top. A bad setting, a
missing input file (config, plan, meta file, annotation file, eval file, --resume checkpoint) or a missing
--log package ends the command with one line on stderr and exit status 2, before anything is built; so does
any other user error met later (INTERNVL3_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Optional

from internvl3_engine.cli import ArgumentParser, run_command

from .checkpointing import resolve_resume
from .config import MODES, load_config_file
from .presets import TRAIN_PRESETS, preset_config
from .trainer import Trainer, check_plan


# The exit status of a run a stop signal ended after checkpointing (as a shell reports a SIGTERM death: the
# scheduler sees an unfinished job and can requeue it; --resume auto continues it).
STOPPED_STATUS = 128 + signal.SIGTERM


def load_plan(path: str):
    """A ParallelPlan from a YAML/JSON file (ParallelPlan.to_dict's layout: dtypes by name)."""
    from internvl3_engine.parallel import ParallelPlan

    data = load_config_file(path)  # its errors name the file
    try:
        return ParallelPlan.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--preset", choices=TRAIN_PRESETS,
                        help="demo (the default) or a model preset; with --init it must describe the weights' architecture")
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig settings (nested: optim: {lr: ...}) overriding the preset")
    parser.add_argument("--data", help="meta JSON of the datasets (default: the generated demo data)")
    parser.add_argument("--mode", choices=MODES, help="pretrain (default), sft or mpo")
    parser.add_argument("--output-dir", help="where checkpoints, metrics, the loss curve and final weights go")
    parser.add_argument("--max-steps", type=int, help="optimizer steps; 0: a dry run (build, load, shard, report memory)")
    parser.add_argument("--export", help="write the model's weights to this folder (transformers layout) after the run")
    parser.add_argument("--resume", help='a checkpoint folder, or "auto" for the latest in the output dir')
    parser.add_argument("--seed", type=int)
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps")
    parser.add_argument("--keep-last", type=int, help="keep the last K checkpoints")
    parser.add_argument("--log-every", type=int, help="write metrics every N steps")
    parser.add_argument("--log", help="metric backends beside metrics.jsonl: tensorboard, wandb, tensorboard,wandb or none")
    parser.add_argument("--plan", help="ParallelPlan YAML/JSON: shard with internvl3_engine.parallel (torchrun)")
    parser.add_argument("--init", help="start from these weights (a save_pretrained folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# The flags and the TrainConfig fields they set.
FLAG_FIELDS = {
    "data": "data.path", "output_dir": "output_dir", "max_steps": "max_steps", "seed": "seed", "init": "init",
    "save_every": "checkpoint.save_every", "keep_last": "checkpoint.keep_last", "log_every": "logging.log_every", "log": "logging.log",
}


def flag_settings(args) -> dict:
    """The settings of the flags given (not None), nested: {"checkpoint": {"save_every": 8}, ...}."""
    settings: dict = {}
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            *sections, field = name.split(".")
            target = settings
            for section in sections:
                target = target.setdefault(section, {})
            target[field] = value
    return settings


def config_from_args(args):
    """The TrainConfig: preset (with the mode's defaults), then --config, then the flags."""
    file_settings = load_config_file(args.config) if args.config else {}
    mode = args.mode or file_settings.get("mode", "pretrain")
    preset = args.preset or "demo"
    try:
        config = preset_config(preset, mode).updated(file_settings)
    except ValueError as error:
        raise ValueError(f"{args.config}: {error}") from None
    config = config.updated(flag_settings(args))
    if preset == "demo" and mode == "mpo" and config.init is None and "init" not in file_settings:
        config = _with_pretrained_demo(config)
    if config.init is not None and args.preset is not None:
        _check_init_matches_preset(config, args.preset)
    return config


def _with_pretrained_demo(config):
    """The demo's MPO starts from the pre-trained demo's final weights: beside the output folder (runs/demo
    beside runs/demo-mpo), else where the demo writes them by default; without them it says it starts from
    a fresh initialisation."""
    default = os.path.join(preset_config("demo").output_dir, "final")
    for pretrained in (os.path.join(os.path.dirname(config.output_dir) or ".", "demo", "final"), default):
        if os.path.isfile(os.path.join(pretrained, "config.json")):
            print(f"MPO starts from the pre-trained demo's weights: {pretrained}")
            return config.updated({"init": pretrained})
    print(f"no pre-trained demo weights at {default}: MPO starts from a fresh initialisation (train the demo first, "
          "`python -m model.train --preset demo`, or give --init)")
    return config


def _check_init_matches_preset(config, preset: str) -> None:
    """ValueError when --init's weights are not of --preset's architecture (the weights' config.json would set
    the model without a word)."""
    from ..weights import read_config

    weights, named = read_config(config.init), config.model_config()
    if (weights.vision, weights.projector, weights.text) != (named.vision, named.projector, named.text):
        raise ValueError(f"--init {config.init} holds a {weights.name} model, not --preset {preset}'s architecture: drop --preset "
                         "(the weights' config.json sets the model) or give weights of that preset")


def _run(args) -> int:
    config = config_from_args(args)
    plan = load_plan(args.plan) if args.plan else None
    if plan is not None:  # refused before anything is built
        plan.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
        check_plan(plan, config)
    resolve_resume(args.resume, config.output_dir)  # a --resume that is no checkpoint, named before the build
    with Trainer(config, plan=plan, resume=args.resume, show_progress=not args.no_progress) as trainer:
        # On every way out: the loader's workers, the checkpoint writer and the process group ended.
        result = trainer.train()
        if result.stopped:
            return STOPPED_STATUS
        if args.export:
            trainer.export(args.export)
    return 0


def main(argv: Optional[list] = None) -> int:
    """The command: a user error (a missing file, a bad setting, a missing --log package) ends it with one
    line on stderr and status 2 (INTERNVL3_DEBUG=1: the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _run(args))

