"""The training loop: native multimodal pre-training, SFT and MPO of InternVL3 on packed data.

One optimizer step = ``grad_accum`` packs per rank. The language-model loss of a step is InternVL3's
square-averaged loss over all of the step's packs on all ranks, sum(w * CE) / sum(w): each pack's
weighted sum goes through internvl3_engine.parallel.data_parallel_loss with the rank's sum(w) over the
step, so the gradients are the global loss's whatever the accumulation and world size. A step whose loss
or gradient norm is not finite is skipped (no optimizer update) and reported.

Data (model.data.loading): every rank plans the same packs from the data index (token counts and tiles,
measured once per annotation file and cached beside it), the vision-aware balancer shares each step's
dp_world x grad_accum packs out, and each rank decodes only its own, in DataLoader worker processes ahead
of the step. The planned position is the same on every rank, so a checkpoint resumes at any world size.

Trainer: ``forward_backward_step`` runs a step's packs through the loss (LM or MPO) with backward;
``train_step`` is one optimizer step (its packs, forward_backward_step, the loss over the ranks, gradient
clipping, the non-finite check, the optimizer's and the schedule's steps) and returns a StepResult;
``train`` is the loop around it (resume, metrics with MFU, progress bar, checkpoints, the final weights
and evaluation).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from internvl3_engine.parallel import (
    ContextShard,
    ParallelPlan,
    ParallelState,
    check_context_parallel_heads,
    checkpoint_blocks,
    gather_chunks,
    clip_grad_norm_,
    parallelize,
)
from internvl3_engine.planner import ModelShape, training_flops

from ..data import (
    ConversationEncoder,
    IGNORE_INDEX,
    DataErrors,
    MixedStream,
    PackDecoder,
    Packer,
    RecordDataset,
    StepPlanner,
    build_loader,
    check_budget_fits,
    decoding_peer,
    start_loader,
    load_meta,
    load_or_build_index,
    load_tokenizer,
)
from ..modeling import InternVL3
from ..weights import load_weights_distributed, read_config, save_weights_distributed
from . import checkpointing
from .config import TrainConfig
from .distributed import broadcast_batch, init_distributed, resolve_device, seed_everything
from .evaluation import evaluate_choices, format_accuracy
from .metrics import MetricsLog, build_sinks, peak_flops, plot_loss_curve, progress_bar
from .mpo import RunningMean, batch_reward_mean, mpo_terms, pair_logps
from .preemption import StopRequest
from .optim import COMPONENTS, apply_freezing, build_optimizer, build_scheduler, parameter_groups


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path}")


def check_data_files(meta_path: str, eval_file: Optional[str]) -> None:
    """FileNotFoundError naming the first missing input file: the meta file, an annotation file it lists,
    the eval file (checked before the run builds anything)."""
    _require_file(meta_path, "data (the meta file)")
    for spec in load_meta(meta_path):
        _require_file(spec.annotation, f"{meta_path}: dataset {spec.name!r}: annotation")
    if eval_file is not None:
        _require_file(eval_file, "eval_file")


def check_plan(plan: ParallelPlan, config: TrainConfig) -> None:
    """ValueError for a plan this trainer cannot run with ``config`` (checked before anything is built)."""
    if plan.cp > 1:
        text = (read_config(config.init) if config.init else config.model_config()).text
        if text.num_heads % plan.tp or text.num_kv_heads % plan.tp:
            raise ValueError(f"tp = {plan.tp} must divide the LLM's {text.num_heads} query and {text.num_kv_heads} key-value heads")
        check_context_parallel_heads(plan.cp, text.num_heads // plan.tp, text.num_kv_heads // plan.tp)


# Steps the data planner plans ahead of the loader, in its own thread (StepPlanner's ahead): planning every
# rank's packs overlaps the training step instead of running between two.
PLAN_AHEAD = 2


def reference_plan(plan: ParallelPlan) -> ParallelPlan:
    """The plan of MPO's frozen reference model: the policy's layout and dtypes with every component zero3.
    It only runs no-grad forwards, and FSDP2 reshards a zero2 or replicated component only after a
    backward, so under the policy's plan those would stay whole on every rank after the first forward."""
    return dataclasses.replace(plan, **{
        name: dataclasses.replace(plan.component(name), sharding="zero3", activation_checkpointing=False) for name in COMPONENTS
    })


def check_ranks_agree(digests: dict, specs: list, device: torch.device, what: str) -> None:
    """ValueError on every rank when a dataset's digest (``digests``: by dataset name) differs between the
    ranks (two all-reduces of one int64 per dataset of ``specs``), naming its annotation file: a node-local
    copy that differs, or a file changed between the ranks' reads, would give the ranks different packs
    without a word. ``what``: what the digests are of, for the message."""
    values = torch.tensor([digests.get(spec.name, 0) for spec in specs], dtype=torch.int64, device=device)
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differing = [spec.annotation for spec, a, b in zip(specs, low.tolist(), high.tolist()) if a != b]
    if differing:
        raise ValueError(f"{differing[0]}: {what} differ between the ranks; every rank must read the same file "
                         "(a node-local copy that differs, or a file changed while the ranks read it)")


def _local_bytes(model) -> int:
    """Bytes of ``model``'s parameters this rank holds (its shards of DTensors)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def _anonymous_bytes() -> Optional[int]:
    """This process's resident anonymous memory (RssAnon: allocations, not mapped files), on Linux; else None."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _all_reduce(value: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=op or dist.ReduceOp.SUM)
    return value


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


@dataclass
class TrainResult:
    losses: list  # the loss of every step run by this call (None for skipped steps)
    final_step: int
    skipped_steps: list
    output_dir: str
    final_weights: Optional[str] = None
    accuracy: Optional[dict] = None
    data_errors: Optional[DataErrors] = None
    memory: Optional[list] = None  # a dry run's per-rank report (start.json): bytes held, peak memory, start time
    stopped: bool = False  # a stop signal (SIGTERM) ended the run early, after checkpointing its last step


@dataclass
class StepResult:
    """What train_step did, for the loop to log."""

    loss: float  # the step's loss over all ranks (not finite when the step was skipped)
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    skipped: bool  # True: the loss or the gradient norm was not finite, no update
    parts: dict  # the loss's parts (MPO's terms and reward statistics; {} for the LM loss)
    balance: Optional[dict]  # the step's load balance under a plan (imbalance, imbalance_naive)
    data_wait_s: float  # how long the step waited for its packs (0 when the workers had them ready)
    batches: list  # this rank's packs of the step
    images_decoded: int = 0  # image files decoded for this rank's packs
    decode_s: float = 0.0  # the worker's time on this rank's packs
    digests: Optional[dict] = None  # the planner's per-dataset digests after this step (StepPlanner.digests)


# ---- the trainer


class Trainer:
    def __init__(self, config: TrainConfig, plan=None, resume: Optional[str] = None, show_progress: bool = True, echo=print):
        self.config = config
        self.plan = plan
        self.resume = resume
        self.show_progress = show_progress
        self.echo = echo
        self.resumed_from: Optional[tuple[str, int]] = None  # (checkpoint, step) once train() restored one
        self.distributed = plan is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(config.device)
        self._owns_process_group = self.distributed and not dist.is_initialized()  # close() ends what it began
        if self.distributed:
            self.rank, self.world = init_distributed(self.device)
        else:
            self.rank, self.world = 0, 1
        # Data-parallel coordinates: tensor- and context-parallel peers (a plan's tp, cp > 1) train on the same
        # packs; context-parallel peers split each pack's tokens (cp_group).
        self.dp_rank, self.dp_world = self.rank, self.world
        self.cp_group = None
        self.is_main = self.rank == 0
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.autocast_dtype = getattr(torch, config.autocast_dtype) if self.device.type == "cuda" else None
        seed_everything(config.seed)
        self._began = time.perf_counter()
        self._build()

    # ---- setup

    def _say(self, message: str) -> None:
        if self.is_main:
            self.echo(message)

    def _build(self) -> None:
        config = self.config
        self.meta_path, self.eval_file = self._data_paths()
        check_data_files(self.meta_path, self.eval_file)
        # Built now so that a backend's missing package stops the run before anything is computed.
        self.sinks = build_sinks(config.logging.log, config.output_dir, dataclasses.asdict(config)) if self.is_main else []
        self.tokenizer = load_tokenizer(config.data.tokenizer)

        # Under a plan the model is built on the meta device and each rank materialises only its shards after
        # parallelize, then reads them from --init or initialises them (the sharded start, _sharded); in one
        # process it is built whole. Both initialise from config.seed with the same values (init_weights).
        if self.distributed:
            self.model_config = read_config(config.init) if config.init else config.model_config()
            with torch.device("meta"):
                self.model = InternVL3(self.model_config)
        elif config.init:
            self.model = InternVL3.from_pretrained(config.init, dtype=torch.float32, device="cpu")
            self.model_config = self.model.config
        else:
            self.model_config = config.model_config()
            self.model = InternVL3(self.model_config, init_seed=config.seed)
        self._check_tokenizer()
        self.parameter_counts = self.model.num_parameters()
        self.model_shape = ModelShape.from_modules(self.model_config.to_hf(), self.model)  # for FLOPs: before sharding
        components = self.model.engine_components()
        apply_freezing(components, config.optim.frozen())
        self._build_indexes()
        self.reference = None
        self.precomputed = False
        if config.mode == "mpo":
            self.precomputed = self._reference_is_precomputed()
            if not self.precomputed:
                # The frozen policy, copied before the model is sharded; under a plan sharded the same way.
                self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.distributed:
            plan = self.plan or ParallelPlan()
            check_plan(plan, config)
            policy_plan = plan
            if config.activation_checkpointing:
                policy_plan = dataclasses.replace(plan, **{
                    name: dataclasses.replace(plan.component(name), activation_checkpointing=True) for name in COMPONENTS
                })
            self.parallel_state = self._sharded(self.model, policy_plan)
            self.dp_rank, self.dp_world = self.parallel_state.dp_rank, self.parallel_state.dp_world_size
            self.cp_group = self.parallel_state.cp_group
            if self.reference is not None:  # on the policy's meshes: no process groups of its own
                self._sharded(self.reference, reference_plan(plan), self.parallel_state.meshes)
        else:
            self.model.to(self.device)
            if self.reference is not None:
                self.reference.to(self.device)
            if config.activation_checkpointing:
                for blocks in (self.model.vision.layers, self.model.language.layers):
                    checkpoint_blocks(blocks)

        optim = config.optim
        groups = parameter_groups(components, optim.lr, optim.weight_decay, optim.component_lr())
        self.optimizer = build_optimizer(groups, optim.betas, optim.eps, self.device)
        # max_steps 0 (a dry run) takes no step: any schedule length will do.
        self.scheduler = build_scheduler(self.optimizer, optim.warmup_steps, max(config.max_steps, 1), optim.min_lr_ratio)
        self.trainable = [p for group in groups for p in group["params"]]
        self.reward_shift = RunningMean()
        self.checkpoints = checkpointing.CheckpointWriter(config.output_dir, self.distributed, config.checkpoint.keep_last,
                                                          config.checkpoint.asynchronous, self.device)
        self._build_loader()

    def _sharded(self, model: InternVL3, plan: ParallelPlan, meshes=None) -> ParallelState:
        """parallelize ``model`` (on the meta device) under ``plan`` (on ``meshes``, else its own), then
        materialise its shards on this rank's device and read them from the --init checkpoint, or initialise
        them as one process would."""
        state = parallelize(model, plan, mesh=meshes)
        model.to_empty(device=self.device)
        if self.config.init:
            load_weights_distributed(model, self.config.init)
        else:
            model.init_weights(seed=self.config.seed)
        return state

    def _data_paths(self) -> tuple[str, Optional[str]]:
        config = self.config
        if config.data.path is not None:
            return config.data.path, config.logging.eval_file
        from .demo_data import generate

        folder = os.path.join(config.output_dir, "data")
        if self.is_main:
            meta = generate(folder, seed=config.seed)
        if self.distributed:
            dist.barrier()
        meta = os.path.join(folder, "meta.json")
        if config.mode == "mpo":
            meta = os.path.join(folder, "meta_mpo.json")
        return meta, config.logging.eval_file or os.path.join(folder, "eval.jsonl")

    def _check_tokenizer(self) -> None:
        vocab, image_token = self.model_config.text.vocab_size, self.model_config.image_token_id
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model's vocabulary only {vocab}")
        if self.tokenizer.img_context_id != image_token:
            raise ValueError(
                f"the tokenizer's <IMG_CONTEXT> is {self.tokenizer.img_context_id}, the model's image_token_id {image_token}: "
                "give the model's tokenizer (--config data: {tokenizer: folder})"
            )

    def _build_indexes(self) -> None:
        """The encoder, the tiler and the datasets' indexes (cached; under torch.distributed built by all
        ranks together)."""
        data, model_config = self.config.data, self.model_config
        self.encoder = ConversationEncoder(self.tokenizer, num_image_token=model_config.tokens_per_tile, system_message=data.system_text())
        self.tiler = data.tiler(model_config.vision.image_size)
        self.specs = load_meta(self.meta_path)
        show = self.is_main and self.show_progress
        self.indexes = {
            spec.name: load_or_build_index(spec, self.encoder, self.tiler,
                                           lambda items, total, what: progress_bar(total, 0, show, items, what, unit="record"),
                                           video_frames=data.frame_sampling())
            for spec in self.specs
        }
        if self.distributed:
            check_ranks_agree({name: index.content_digest() for name, index in self.indexes.items()}, self.specs, self.device,
                              "the data index's record shapes")

    def _reference_is_precomputed(self) -> bool:
        """Whether every preference record carries its reference log-probabilities (then MPO needs no
        reference model), from the indexes."""
        pairs, with_reference = (sum(counts) for counts in zip(*(index.preference_pairs() for index in self.indexes.values())))
        return pairs > 0 and with_reference == pairs

    def _build_loader(self) -> None:
        """The data: this rank's StepPlanner over the datasets' indexes and the PackDecoder its workers run
        (model.data.loading)."""
        config, data, model_config = self.config, self.config.data, self.model_config
        self.errors = DataErrors()
        specs, indexes = self.specs, self.indexes

        def datasets():
            # Built twice: the planner's and the decoder's datasets report bad records to different journals.
            built = [RecordDataset(spec, self.encoder, self.tiler, seed=config.seed, augment=data.augment, index=indexes[spec.name],
                                   video_frames=data.frame_sampling()) for spec in specs]
            if config.mode == "mpo":
                built = [dataset for dataset in built if dataset.kind == "preference"]
                if not built:
                    raise ValueError(f"{self.meta_path}: --mode mpo needs preference datasets (records with chosen/rejected)")
                return built
            built = [dataset for dataset in built if dataset.kind != "preference"]
            if not built:
                raise ValueError(f"{self.meta_path}: every dataset holds preference pairs (chosen/rejected): train on them "
                                 f"with --mode mpo, or add {config.mode} data")
            return built

        # Every rank must run the ViT at every step (FSDP's collectives): text-only packs get a blank tile.
        self.packing = data.packing(blank_tile_size=model_config.vision.image_size if self.distributed else None)
        stream = MixedStream(datasets(), data.language_weight, data.multimodal_weight, DataErrors(journal=[]), shapes=True)
        # A budget no sample fits: an error now, not a planner drawing samples forever (datasets the stream draws from).
        check_budget_fits(self.packing, [stream.datasets[name].index for names in stream.groups.values() for name in names])
        self.planner = StepPlanner(stream, Packer(self.packing, seed=config.seed), config.grad_accum, self.dp_rank, self.dp_world,
                                   cost=self._plan_flops, ahead=PLAN_AHEAD)
        decoder = PackDecoder({dataset.name: dataset for dataset in datasets()}, self.packing, config.seed,
                              self.rank % self._pack_peers, self._pack_peers)
        self._peer_group = self._pack_peer_group()
        self.loader = build_loader(self.planner, decoder, data.num_workers, data.prefetch_factor, self.device.type == "cuda", config.seed)
        self._steps = None  # the loader's iterator, started at the first step (after a resume restored the loader)
        self._decode_errors: list = []  # this rank's decoding skips not yet recorded by the other ranks
        self.images_decoded = 0  # by this rank's workers, since this process started

    def _flops(self, tokens: int, tiles: int, lengths: list) -> float:
        """Forward + backward model FLOPs of a pack of ``tokens`` in samples of ``lengths`` with ``tiles`` ViT
        tiles (the engine's formula)."""
        return training_flops(self.model_shape, tokens, tiles, lengths)["total"]

    def _plan_flops(self, plan) -> float:
        """The balancer's cost of a planned pack: its FLOPs (a pack without images runs the ViT on one blank
        tile under a plan, which costs time too)."""
        tiles = plan.num_tiles or (1 if self.packing.blank_tile_size is not None else 0)
        return self._flops(plan.num_tokens, tiles, plan.sample_lengths())

    def _pack_peer_group(self):
        """The process group of the ranks sharing this rank's packs (None alone): the tensor- or the
        context-parallel group when only one of them has more than one rank, else a new group over both
        (contiguous ranks, tensor- and context-parallel ranks innermost)."""
        if self._pack_peers == 1:
            return None
        plan = self.parallel_state.plan
        if plan.cp == 1:
            return self.parallel_state.meshes.tensor_parallel("zero3").get_group()
        if plan.tp == 1:
            return self.cp_group
        peers = init_device_mesh(self.device.type, (self.world // self._pack_peers, self._pack_peers), mesh_dim_names=("data", "peer"))
        return peers["peer"].get_group()

    @property
    def _pack_peers(self) -> int:
        """The ranks that train on each pack: tensor- and context-parallel peers (world / dp_world)."""
        return self.world // self.dp_world

    def _next_step_data(self):
        """This rank's decoded packs of the next step (model.data.loading), its skips recorded: the
        planning's are the same on every rank, the decoding's this rank's until _share_errors."""
        if self._steps is None:
            self._steps = start_loader(self.loader)
        data = next(self._steps)
        if self._peer_group is not None:  # each pack comes from the peer that decoded it (PackDecoder)
            data.batches = [broadcast_batch(batch, self._peer_group, decoding_peer(data.step, index, self._pack_peers), self.device)
                            for index, batch in enumerate(data.batches)]
        for file, line, reason in data.errors + data.decode_errors:
            self.errors.record(file, line, reason)
        self._decode_errors += data.decode_errors
        self.images_decoded += data.images_decoded
        return data

    def _stop_loader(self) -> None:
        """End the loader's worker processes now: left to the garbage collector, they would be shut down in
        whichever thread collects the trainer (e.g. a checkpoint writer's), waiting out a timeout each."""
        if self._steps is not None and hasattr(self._steps, "_shutdown_workers"):  # num_workers 0: no workers
            self._steps._shutdown_workers()  # what the iterator's __del__ runs; DataLoader has no public close
        self._steps = None
        self.planner.close()

    def _share_errors(self) -> None:
        """Every rank's decoding skips recorded on every rank (a collective: call it on all ranks)."""
        if not self.distributed:
            return
        shares = [None] * self.world
        dist.all_gather_object(shares, self._decode_errors)
        for rank, share in enumerate(shares):
            if rank != self.rank:
                for file, line, reason in share:
                    self.errors.record(file, line, reason)
        self._decode_errors = []

    # ---- state

    def _trainer_state(self, step: int) -> dict:
        return {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpointing.rng_state(),
            "data": {"loader": self.loader.state_dict(), "errors": self.errors.state_dict(), "num_workers": self.config.data.num_workers},
            "reward_shift": self.reward_shift.state_dict(),
            "config": dataclasses.asdict(self.config),
            "model_config": self.model_config.to_dict(),
            "world_size": self.world,
        }

    def _restore(self, path: str) -> int:
        state = checkpointing.load_checkpoint(path, self.model, self.optimizer, sharded=self.distributed)
        self._resume_schedule(state["scheduler"])
        self._restore_data(state)
        self.reward_shift.load_state_dict(state["reward_shift"])
        checkpointing.set_rng_state(state["rng"])
        return int(state["step"])

    def _restore_data(self, state: dict) -> None:
        if "data" not in state:
            raise ValueError("the checkpoint was written by an older trainer (its data position is not a loader state): "
                             "it cannot be resumed by this one")
        saved = state["data"]
        if saved["num_workers"] != self.config.data.num_workers:
            raise ValueError(f"the checkpoint's run loaded data with data.num_workers {saved['num_workers']}, this one with "
                             f"{self.config.data.num_workers}: resume with the same number of workers")
        self.loader.load_state_dict(saved["loader"])
        self.errors.load_state_dict(saved["errors"])

    def _resume_schedule(self, saved: dict) -> None:
        """The learning-rate schedule from the checkpoint's step on under this run's settings, so that a
        larger max_steps continues the cosine to its new end (the checkpoint's settings would hold the lr
        at the floor past its old end). ``saved``: the checkpoint's scheduler state_dict."""
        config = self.config
        done = int(saved["last_epoch"])
        self.scheduler = build_scheduler(self.optimizer, config.optim.warmup_steps, max(config.max_steps, 1), config.optim.min_lr_ratio,
                                         completed_steps=done)
        before, now = saved["lr_lambdas"][0], vars(self.scheduler.lr_lambdas[0])
        if before != now and config.max_steps > 0:  # a dry run takes no step: it has no schedule to report
            self._say(f"learning-rate schedule from step {done} on: {now} (the checkpoint's run had {before})")

    # ---- forward passes

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, model, batch, **kwargs):
        with self._autocast():
            return model(
                batch.input_ids, batch.pixel_values, batch.cu_seqlens, batch.positions,
                kwargs.pop("labels", None), kwargs.pop("loss_weights", None), batch.max_seqlen,
                image_flags=batch.image_flags, context_parallel_group=self.cp_group, **kwargs,
            )

    def _weight_sum(self, batch) -> torch.Tensor:
        """sum(w) of the pack's tokens this rank computes the loss of: all of them, or under context
        parallelism its share (the ranks' shares add up to the pack's)."""
        if self.cp_group is None:
            return batch.loss_weights.sum()
        shard = ContextShard.of(batch.num_tokens, dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group))
        return shard.local(batch.loss_weights, 0.0).sum()

    def _lm_step(self, batches) -> tuple[torch.Tensor, dict]:
        """Forward and backward of a step's packs under the square-averaged LM loss."""
        from internvl3_engine.parallel import data_parallel_loss

        weight_sum = torch.stack([self._weight_sum(batch) for batch in batches]).sum()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            # loss_normalizer 1: the model returns sum(w * CE); data_parallel_loss divides by the global sum(w).
            output = self._forward(self.model, batch, labels=batch.labels, loss_weights=batch.loss_weights, loss_normalizer=1.0)
            term = data_parallel_loss(output.loss.float(), weight_sum)
            term.backward()
            total += term.detach()
        return total, {}

    def _pair_logps(self, model, batch):
        """The pack's summed response log-probabilities under ``model``, from its per-token CE (the engine's
        linear cross-entropy: no [T, V] logits)."""
        output = self._forward(model, batch, labels=batch.labels, loss_reduction="none")
        token_logps = -output.loss
        if self.cp_group is not None:
            # This rank's tokens' values: the whole pack's gathered (differentiably) to sum each response.
            token_logps = gather_chunks(token_logps, self.cp_group)[: batch.num_tokens]
        return pair_logps(token_logps, batch.labels, batch.cu_seqlens, batch.roles)

    def _reference_logps(self, batch):
        if self.precomputed:
            missing = [source for source, reference in zip(batch.sources[::2], batch.references) if reference is None]
            if missing:
                raise RuntimeError(f"{missing[0]}: the record's reference log-probabilities are gone since it was indexed")
            values = torch.tensor(batch.references, dtype=torch.float32, device=self.device).reshape(-1, 2)
            return values[:, 0], values[:, 1]
        with torch.no_grad():
            logps = self._pair_logps(self.reference, batch)
        return logps.chosen, logps.rejected

    def _mpo_step(self, batches) -> tuple[torch.Tensor, dict]:
        """Forward and backward of a step's packs of preference pairs under the MPO loss."""
        from internvl3_engine.parallel import data_parallel_loss

        beta, weights = self.config.mpo.beta, self.config.mpo.weights
        pairs = torch.tensor(float(sum(batch.roles.count("chosen") for batch in batches)), device=self.device)
        chosen_tokens = torch.stack([(batch.labels[self._chosen_mask(batch)] != IGNORE_INDEX).sum() for batch in batches]).sum().float()
        total = torch.zeros((), device=self.device)
        parts = {"preference": 0.0, "quality": 0.0, "nll": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}
        # The BCO shift: the mean reward of the packs of earlier steps (over all ranks), the same for every pack
        # of this step whatever the world size and accumulation; this step's packs join it after the step.
        shift = self.reward_shift.mean
        reward_sum = torch.zeros((), device=self.device)
        for batch in batches:
            if "chosen" not in batch.roles:
                # A pack whose records all failed to decode: no pair, but the ranks' collectives still run.
                if self.reference is not None:
                    with torch.no_grad():
                        self._forward(self.reference, batch, labels=batch.labels, loss_reduction="none")
                (self._forward(self.model, batch, labels=batch.labels, loss_reduction="none").loss.sum() * 0).backward()
                continue
            reference_chosen, reference_rejected = self._reference_logps(batch)
            policy = self._pair_logps(self.model, batch)
            reward_sum += batch_reward_mean(policy.chosen, policy.rejected, reference_chosen, reference_rejected, beta).detach()
            terms = mpo_terms(policy.chosen, policy.rejected, reference_chosen, reference_rejected, -policy.chosen, policy.chosen_tokens, shift, beta)
            term = (
                weights[0] * data_parallel_loss(terms.preference_sum, pairs)
                + weights[1] * data_parallel_loss(terms.quality_sum, pairs)
                + weights[2] * data_parallel_loss(terms.nll_sum, chosen_tokens)
            )
            term.backward()
            total += term.detach()
            # Reported parts: this rank's means over the step.
            parts["preference"] += terms.preference_sum.item() / pairs.item()
            parts["quality"] += terms.quality_sum.item() / pairs.item()
            parts["nll"] += terms.nll_sum.item() / chosen_tokens.item()
            parts["reward_accuracy"] += (terms.rewards_chosen > terms.rewards_rejected).float().sum().item() / pairs.item()
            parts["reward_margin"] += (terms.rewards_chosen - terms.rewards_rejected).sum().item() / pairs.item()
        # The ranks sharing a pack (tensor- and context-parallel peers) count it once.
        self.reward_shift.add(_all_reduce(reward_sum).item() / self._pack_peers, len(batches) * self.dp_world)
        parts["reward_shift"] = self.reward_shift.mean
        return total, parts

    # ---- the step and the loop

    def forward_backward_step(self, batches) -> tuple[torch.Tensor, dict]:
        """Forward and backward of this rank's packs of a step under the run's loss (the LM loss, or MPO's in
        --mode mpo): the gradients accumulate into the parameters. Returns this rank's loss term (the step's
        loss is the mean of the ranks' terms) and the loss's parts to report ({} for the LM loss)."""
        return self._mpo_step(batches) if self.config.mode == "mpo" else self._lm_step(batches)

    def train_step(self) -> StepResult:
        """One optimizer step: the step's packs, their forward and backward, the loss over all ranks,
        gradient clipping, then the update unless the loss or the gradient norm is not finite on some rank
        (the step is skipped), and the learning-rate schedule's step."""
        began = time.perf_counter()
        data = self._next_step_data()
        batches = [batch.to(self.device, non_blocking=True) for batch in data.batches]
        data_wait = time.perf_counter() - began
        loss, parts = self.forward_backward_step(batches)
        loss = _all_reduce(loss) / self.world
        grad_norm = clip_grad_norm_(self.trainable, self.config.optim.grad_clip)
        finite = _all_reduce(torch.tensor(float(_finite(loss) and _finite(grad_norm)), device=self.device), dist.ReduceOp.MIN if dist.is_initialized() else None)
        lr = self.scheduler.get_last_lr()[0]
        skipped = not finite.item() > 0
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss=loss.item(), grad_norm=grad_norm.item(), lr=lr, skipped=skipped, parts=parts,
                          balance=data.balance, data_wait_s=data_wait, batches=batches, images_decoded=data.images_decoded,
                          decode_s=data.decode_s, digests=data.digests)

    def train(self) -> TrainResult:
        """Steps from the checkpoint resumed (or 1) to max_steps: train_step, then the metrics (every
        log_every steps, the first and the last), the progress bar and the checkpoints (every save_every
        steps and the last); then the final weights and the evaluation."""
        config = self.config
        start, resume_path = self._resume_point()
        if config.max_steps == 0:
            return self._dry_run(start)
        os.makedirs(config.output_dir, exist_ok=True)
        if self.is_main:
            for folder in checkpointing.remove_staging(config.output_dir):
                self._say(f"removed {folder}: a checkpoint an earlier run did not finish")
        log = MetricsLog(os.path.join(config.output_dir, "metrics.jsonl"), enabled=self.is_main,
                         resume_step=start if resume_path else None, sinks=self.sinks)
        with StopRequest() as stop:  # SIGTERM: checkpoint the step being taken, then stop
            try:
                if self.is_main and not resume_path:
                    with open(os.path.join(config.output_dir, "train_config.json"), "w", encoding="utf-8") as handle:
                        json.dump({"train": dataclasses.asdict(config), "model": self.model_config.to_dict()}, handle, indent=2, default=str)
                self._say(self._banner(self.parameter_counts))
                peak = peak_flops(self.device)
                losses, skipped = [], []
                bar = progress_bar(config.max_steps, start, self.show_progress and self.is_main)
                window_tokens, window_time = 0, 0.0
                self.model.train()
                step, stopping = start, False
                for step in range(start + 1, config.max_steps + 1):
                    began = time.perf_counter()
                    result = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - began
                    losses.append(None if result.skipped else result.loss)
                    if result.skipped:
                        skipped.append(step)
                        self._report_skipped(step, result, log, bar)
                    # The ranks sharing a pack (tensor- and context-parallel peers) count it once.
                    tokens = _all_reduce(torch.tensor(float(sum(b.num_tokens for b in result.batches)), device=self.device)).item() / self._pack_peers
                    window_tokens += tokens
                    window_time += elapsed
                    stopping = stop.requested_anywhere(self.device)  # then the step just taken is checkpointed
                    saving = step % config.checkpoint.save_every == 0 or step == config.max_steps or stopping
                    logging = step % config.logging.log_every == 0 or step == config.max_steps or step == start + 1
                    if saving or logging:
                        self._share_errors()
                    if logging:
                        entry = self._step_entry(step, result, tokens, window_tokens / max(window_time, 1e-9), elapsed, peak)
                        log.write(entry)
                        window_tokens, window_time = 0, 0.0
                        if bar is not None:
                            bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{result.lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}", refresh=False)
                    if bar is not None:
                        bar.update(1)
                    if self.distributed and (saving or step == start + 1):
                        check_ranks_agree(result.digests, self.specs, self.device, f"the packs planned up to step {step}")
                    if saving:
                        self.checkpoints.save(step, self._trainer_state(step), self.model, self.optimizer)
                    else:
                        self.checkpoints.publish_finished()  # a finished background save, published within a step
                    if stopping:
                        break
                if bar is not None:
                    bar.close()
                self.checkpoints.close()  # the last checkpoint in place before the run reports and exports
                self._stop_loader()
                if stopping:
                    return self._stopped(step, losses, skipped, log, stop)
                return self._finish(step, losses, skipped, log)
            except BaseException:
                # A failed run publishes its finished save only in one process: the ranks of a failed
                # distributed run may never reach the collective that agrees it is complete on all of them.
                with contextlib.suppress(Exception):
                    self.checkpoints.close(publish=not self.distributed)
                raise
            finally:
                self._stop_loader()
                log.close()

    def _stopped(self, step: int, losses: list, skipped: list, log: MetricsLog, stop: StopRequest) -> TrainResult:
        """The end of a run stopped by a signal: its last step is checkpointed; no final weights, no evaluation."""
        folder = checkpointing.latest_checkpoint(self.config.output_dir)
        log.write({"event": "stopped", "step": step, "signal": stop.name or "received by another rank", "checkpoint": folder})
        self._say(f"stopped by {stop.name or 'a signal to another rank'} after step {step}: checkpoint {folder}; "
                  "continue with --resume auto")
        return TrainResult(losses=losses, final_step=step, skipped_steps=skipped, output_dir=self.config.output_dir,
                           data_errors=self.errors, stopped=True)

    def close(self, failed: bool = False) -> None:
        """End what the trainer started: the loader's workers, the checkpoint writer (a save in flight is left
        unpublished: train() publishes on its way out) and the process group it initialised, its threads
        joined before the interpreter exits (left to the interpreter's teardown, gloo's can abort the process
        after a run that did all its work). ``failed``: the process group is left alone, since a rank whose
        peers are still in a collective can hang tearing it down (the process exits with an error anyway).
        ``with Trainer(...) as trainer:`` closes it on the way out."""
        self._stop_loader()
        self.checkpoints.close(publish=False)
        if self._owns_process_group and dist.is_initialized() and not failed:
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)

    def _resume_point(self) -> tuple[int, Optional[str]]:
        """The step the run continues after and the checkpoint restored (0 and None: a fresh start)."""
        resume_path = checkpointing.resolve_resume(self.resume, self.config.output_dir)
        if resume_path is not None:
            start = self._restore(resume_path)
            if 0 < self.config.max_steps < start:
                raise ValueError(f"--resume {resume_path}: the checkpoint is at step {start}, past max_steps "
                                 f"{self.config.max_steps}: give --max-steps above {start} to train on from it")
            self._say(f"resumed from {resume_path} at step {start}")
            self.resumed_from = (resume_path, start)
            return start, resume_path
        if self.resume == "auto":
            self._say(f"no checkpoint in {self.config.output_dir}: starting fresh")
        return 0, None

    def _report_skipped(self, step: int, result: StepResult, log: MetricsLog, bar) -> None:
        if self.is_main:
            message = f"step {step}: non-finite loss ({result.loss}) or gradient norm ({result.grad_norm}): step skipped"
            (bar.write if bar and not bar.disable else self._say)(message)
        log.write({"event": "skipped_step", "step": step, "loss": result.loss, "grad_norm": result.grad_norm})

    def _step_entry(self, step: int, result: StepResult, tokens: float, tokens_per_s: float, elapsed: float, peak) -> dict:
        """The metrics line of a step (MFU where the device's peak FLOP/s is known)."""
        batches = result.batches
        entry = {
            "step": step, "loss": float("nan") if result.skipped else result.loss, "lr": result.lr,
            "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
            "tokens": int(tokens), "tiles": sum(b.num_tiles for b in batches), "samples": sum(b.num_samples for b in batches),
            "data_errors": self.errors.total, "step_time_s": elapsed,
        }
        entry.update(self._data_timing(result, elapsed))
        entry.update(result.parts)
        entry.update(result.balance or {})
        if peak is not None:
            flops = sum(self._flops(b.num_tokens, b.num_tiles, (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()) for b in batches)
            entry["mfu"] = flops / self._pack_peers / elapsed / peak
        return entry

    def _data_timing(self, result: StepResult, elapsed: float) -> dict:
        """The step's data loading over the ranks (a collective): the longest wait for packs and its rank,
        whether the step waited for data (that wait over 10% of the step: receiving ready packs from the
        workers takes a few milliseconds), the slowest worker's decoding time, and the image files decoded by
        all ranks' workers so far."""
        local = torch.tensor([result.data_wait_s, result.decode_s, float(self.images_decoded)], dtype=torch.float64, device=self.device)
        ranks = [local]
        if self.distributed:  # gathered on the device the backend works on (NCCL: the GPU)
            ranks = [torch.zeros_like(local) for _ in range(self.world)]
            dist.all_gather(ranks, local)
        ranks = [entry.cpu() for entry in ranks]
        waits = [float(entry[0]) for entry in ranks]
        slowest = max(range(len(waits)), key=waits.__getitem__)
        return {
            "data_wait_s": waits[slowest], "data_wait_rank": slowest, "data_waited": int(waits[slowest] > 0.1 * elapsed),
            "decode_s": max(float(entry[1]) for entry in ranks),
            "images_decoded": int(sum(float(entry[2]) for entry in ranks)),
        }

    def _chosen_mask(self, batch) -> torch.Tensor:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        chosen = torch.tensor([role == "chosen" for role in batch.roles], device=lengths.device)
        return torch.repeat_interleave(chosen, lengths)

    def _banner(self, counts) -> str:
        config, model_config = self.config, self.model_config
        where = f"{self.device.type}" + (f" x{self.world} ({'plan' if self.plan else 'ddp'})" if self.distributed else "")
        params = (f"{counts['total'] / 1e6:.2f}M parameters (vision {counts['vision'] / 1e6:.2f}M, projector "
                  f"{counts['projector'] / 1e6:.2f}M, language {counts['language'] / 1e6:.2f}M)")
        if self.resumed_from is not None:
            weights = f"weights of {self.resumed_from[0]} (step {self.resumed_from[1]})"
        else:
            weights = f"weights from {config.init}" if config.init else f"weights initialised from seed {config.seed}"
        return (
            f"{config.mode}: {model_config.name} model, {params} on {where}; {weights}; data {self.meta_path}; "
            f"{config.max_steps} steps of {config.grad_accum} x {config.data.max_packed_tokens}-token packs; output {config.output_dir}"
        )

    def _finish(self, step: int, losses: list, skipped: list, log: MetricsLog) -> TrainResult:
        config, metrics_path = self.config, log.path
        result = TrainResult(losses=losses, final_step=step, skipped_steps=skipped, output_dir=config.output_dir, data_errors=self.errors)
        # The planner's counts run a few steps ahead of training (the workers' prefetch).
        packer, stream = self.planner.packer, self.planner.stream
        summary = {"event": "summary", "step": step, "skipped_steps": skipped, "data_errors": self.errors.state_dict(),
                   "truncated": packer.truncated, "dropped": packer.dropped, "mix": stream.token_fractions()}
        result.final_weights = os.path.join(config.output_dir, "final")
        self.export(result.final_weights)
        if self.eval_file:
            # Every rank evaluates: a sharded model's forward needs all of them.
            result.accuracy = evaluate_choices(self.model, self.eval_file, self.encoder, self.tiler, self.device,
                                               self._autocast, config.logging.eval_delta, config.logging.eval_examples,
                                               video_frames=config.data.video_frames)
            summary["accuracy"] = result.accuracy
            log.write({"event": "eval", "step": step, **result.accuracy})
        if self.is_main:
            log.write(summary)
            png = plot_loss_curve(metrics_path, os.path.join(config.output_dir, "loss.png"), f"{config.mode} loss ({self.model_config.name})")
            self.echo(self.errors.summary())
            if packer.truncated or packer.dropped:
                self.echo(f"overlong samples: {packer.truncated} truncated, {packer.dropped} dropped (policy: {config.data.overlong})")
            if skipped:
                self.echo(f"skipped steps (non-finite loss or gradients): {skipped}")
            fractions = stream.token_fractions()
            if losses:  # a run resumed at its last step took none
                self.echo("token mix: " + ", ".join(f"{name} {fraction:.1%}" for name, fraction in fractions.items()))
            finite = [value for value in losses if value is not None]
            if finite:
                head = sum(finite[: max(1, len(finite) // 10)]) / max(1, len(finite[: max(1, len(finite) // 10)]))
                tail = sum(finite[-max(1, len(finite) // 10):]) / max(1, len(finite[-max(1, len(finite) // 10):]))
                self.echo(f"loss: {head:.3f} (first tenth of the run) -> {tail:.3f} (last tenth)")
            self.echo(f"metrics {metrics_path}; loss curve {png}; checkpoints {checkpointing.checkpoint_dir(config.output_dir)}; "
                      f"final weights (transformers layout) {result.final_weights}")
            if result.accuracy:
                self.echo(format_accuracy(result.accuracy))
        if self.distributed:
            dist.barrier()
        return result

    def export(self, path: str) -> None:
        """The model's weights as a transformers-layout checkpoint in ``path`` (config.json + safetensors):
        under a plan written from the shards by every rank (call it on all of them), no rank gathering the
        model."""
        if self.distributed:
            save_weights_distributed(self.model, path)
        elif self.is_main:
            self.model.save_pretrained(path)

    def _dry_run(self, start: int) -> TrainResult:
        """max_steps 0: the model is built, loaded and sharded (and a checkpoint restored); report each rank's
        memory and take no step."""
        import resource

        report = {"rank": self.rank, "parameter_bytes": _local_bytes(self.model), "start_s": time.perf_counter() - self._began,
                  "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "anon_bytes": _anonymous_bytes()}
        if self.reference is not None:
            report["reference_bytes"] = _local_bytes(self.reference)
        if self.device.type == "cuda":
            report["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        reports = [report]
        if self.distributed:
            reports = [None] * self.world
            dist.all_gather_object(reports, report)
        if self.is_main:
            gib = 1024**3
            self._say(self._banner(self.parameter_counts))
            for entry in reports:
                device = f", peak device memory {entry['peak_device_bytes'] / gib:.2f} GiB" if "peak_device_bytes" in entry else ""
                reference = f", MPO reference model {entry['reference_bytes'] / gib:.3f} GiB" if "reference_bytes" in entry else ""
                self._say(f"rank {entry['rank']}: parameters {entry['parameter_bytes'] / gib:.3f} GiB{reference}, "
                          f"peak host memory {entry['peak_host_bytes'] / gib:.2f} GiB{device}")
            self._say(f"dry run (max_steps 0): built, {'loaded, ' if self.config.init else ''}"
                      f"{'sharded over ' + str(self.world) + ' ranks' if self.distributed else 'one process'} "
                      f"in {report['start_s']:.1f} s; no step taken")
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "start.json"), "w", encoding="utf-8") as handle:
                json.dump({"world": self.world, "ranks": reports}, handle, indent=2)
        return TrainResult(losses=[], final_step=start, skipped_steps=[], output_dir=self.config.output_dir,
                           data_errors=self.errors, memory=reports)


# ---- evaluation
