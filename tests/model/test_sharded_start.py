"""A sharded model reads and writes transformers-layout checkpoints shard by shard (model.weights'
load_weights_distributed over torch.distributed.checkpoint's HuggingFace storage, save_weights_distributed
tensor by tensor into the files each rank is dealt): 2 gloo ranks, each plan's placements (FSDP2
zero2/zero3/replicate, tensor parallelism), exact values; the export's files are save_pretrained's, byte for
byte, written while a rank holds its shards and one whole tensor; names and shapes checked before anything
is read."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from model import InternVL3, InternVL3Config
from model.weights import (
    check_checkpoint_matches,
    load_weights_distributed,
    read_config,
    read_tensors,
    save_weights_distributed,
)

PLANS = {
    "default": {},
    "zero3": {"vision": {"sharding": "zero3"}, "projector": {"sharding": "zero3"}},
    "replicate": {"vision": {"sharding": "replicate"}, "language": {"sharding": "replicate"}},
    "tp": {"tp": 2},
}


def random_checkpoint(folder, tie: bool = False) -> dict:
    """A tiny InternVL3 with random weights saved in the transformers layout; returns its tensors."""
    config = InternVL3Config.preset("tiny")
    config.text = dataclasses.replace(config.text, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = InternVL3(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(folder)
    return dict(read_tensors(folder))


def _worker(rank: int, init_file: str, folder: str, out: str, plan: dict, reports):
    import torch.distributed as dist

    from internvl3_engine.parallel import ParallelPlan, parallelize

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        with torch.device("meta"):
            model = InternVL3(read_config(folder))
        parallelize(model, ParallelPlan.from_dict(plan))
        model.to_empty(device="cpu")
        load_weights_distributed(model, folder)
        expected = InternVL3.from_pretrained(folder).state_dict()
        for name, tensor in model.state_dict().items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            assert torch.equal(full, expected[name]), name
        save_weights_distributed(model, out)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        reports.put({"error": f"rank {rank}: {traceback.format_exc()}"})
        raise


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: the peak resident size), in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _export_worker(rank: int, init_file: str, folder: str, out: str, max_shard_size: int, reports):
    """Load the default plan's shards, then export: reports how far the export took the resident size above
    what the rank held before it."""
    import torch.distributed as dist

    from internvl3_engine.parallel import ParallelPlan, parallelize

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        with torch.device("meta"):
            model = InternVL3(read_config(folder))
        parallelize(model, ParallelPlan())
        model.to_empty(device="cpu")
        load_weights_distributed(model, folder)
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # VmHWM starts again from the resident size now
        save_weights_distributed(model, out, max_shard_size=max_shard_size)
        reports.put({"rank": rank, "export_growth": _status_bytes("VmHWM") - before})
        dist.destroy_process_group()
    except Exception:
        reports.put({"error": f"rank {rank}: {traceback.format_exc()}"})
        raise


def run_two_ranks(tmp_path, worker, *args) -> list[dict]:
    """``worker(rank, init_file, *args, reports)`` on 2 spawned ranks; what they put in ``reports``."""
    context = mp.get_context("spawn")
    reports = context.SimpleQueue()
    mp.start_processes(worker, args=(str(tmp_path / "init"), *args, reports), nprocs=2, join=True, start_method="spawn")
    found = []
    while not reports.empty():
        found.append(reports.get())
    for report in found:
        if "error" in report:
            pytest.fail(report["error"])
    return found


def assert_same_files(folder, expected) -> None:
    names = sorted(os.listdir(folder))
    assert names == sorted(os.listdir(expected))
    for name in names:
        assert filecmp.cmp(os.path.join(folder, name), os.path.join(expected, name), shallow=False), name


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_each_rank_loads_its_shards_and_the_export_reproduces_the_checkpoint(tmp_path, plan):
    original = random_checkpoint(tmp_path / "ckpt", tie=plan == "default")
    run_two_ranks(tmp_path, _worker, str(tmp_path / "ckpt"), str(tmp_path / "export"), PLANS[plan])
    exported = dict(read_tensors(tmp_path / "export"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert not (tmp_path / "export" / "sharded").exists()
    assert InternVL3.from_pretrained(tmp_path / "export").config.to_dict() == read_config(tmp_path / "ckpt").to_dict()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size through Linux's /proc")
def test_ranks_export_the_files_save_pretrained_writes_each_holding_its_shards_and_one_tensor(tmp_path):
    """2 ranks export a 212 MB model (24 layers of tensors of at most 2.4 MB) into 32 MiB files: both ranks
    write files (dealt in turn), the folder is save_pretrained's byte for byte, and the export takes no
    rank's resident size more than a quarter of the model above what it held (a rank holding its half of
    the model once more, as DCP's staging of the shards did, would take half of it)."""
    config = InternVL3Config.preset("tiny")
    config.text = dataclasses.replace(config.text, hidden_size=384, intermediate_size=1536, num_layers=24)
    model = InternVL3(config)
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "expected", max_shard_size=32 * 1024**2)
    del model
    reports = run_two_ranks(tmp_path, _export_worker, str(tmp_path / "ckpt"), str(tmp_path / "export"), 32 * 1024**2)
    assert len([name for name in os.listdir(tmp_path / "expected") if name.endswith(".safetensors")]) >= 4
    assert_same_files(tmp_path / "export", tmp_path / "expected")
    assert sorted(report["rank"] for report in reports) == [0, 1]
    for report in reports:
        assert report["export_growth"] < model_bytes / 4, (report, model_bytes)


def test_without_a_process_group_the_export_is_save_pretrained_and_replaces_an_earlier_one(tmp_path):
    """One process with plain tensors: one file and several, as save_pretrained writes them; an export into
    a folder holding another checkpoint's files leaves none of them; a shard size that is not positive is
    named."""
    torch.manual_seed(0)
    model = InternVL3(InternVL3Config.preset("tiny"))
    for max_shard_size in (200_000, 5 * 1024**3):
        model.save_pretrained(tmp_path / f"expected{max_shard_size}", max_shard_size=max_shard_size)
        save_weights_distributed(model, tmp_path / "export", max_shard_size=max_shard_size)
        assert_same_files(tmp_path / "export", tmp_path / f"expected{max_shard_size}")
    with pytest.raises(ValueError, match="max_shard_size must be positive"):
        save_weights_distributed(model, tmp_path / "export", max_shard_size=0)


def test_mismatched_checkpoints_are_named_before_anything_is_read(tmp_path):
    random_checkpoint(tmp_path / "ckpt")
    config = read_config(tmp_path / "ckpt")
    wider = dataclasses.replace(config.text, intermediate_size=config.text.intermediate_size * 2)
    with torch.device("meta"):
        model = InternVL3(dataclasses.replace(config, text=wider))
    with pytest.raises(ValueError, match=r"language_model\.model\.layers\.0\.mlp\.down_proj\.weight: the checkpoint's "
                                         r"shape \(\d+, \d+\) is not the config's \(\d+, \d+\)"):
        check_checkpoint_matches(model, tmp_path / "ckpt")
    deeper = dataclasses.replace(config.text, num_layers=config.text.num_layers + 1)
    with torch.device("meta"):
        model = InternVL3(dataclasses.replace(config, text=deeper))
    with pytest.raises(ValueError, match=r"lacks .*layers\.%d\." % config.text.num_layers):
        check_checkpoint_matches(model, tmp_path / "ckpt")


def test_a_missing_shard_file_is_named(tmp_path):
    config = InternVL3Config.preset("tiny")
    InternVL3(config).save_pretrained(tmp_path / "ckpt", max_shard_size=200_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "ckpt" / gone)
    with torch.device("meta"):
        model = InternVL3(config)
    with pytest.raises(FileNotFoundError, match=gone):
        check_checkpoint_matches(model, tmp_path / "ckpt")


def test_opengvlab_layout_is_refused_with_the_conversion_command(tmp_path):
    from model.__main__ import main

    config = InternVL3Config.preset("tiny")
    InternVL3(config).save_pretrained(tmp_path / "ogl", layout="opengvlab")
    with torch.device("meta"):
        model = InternVL3(config)
    with pytest.raises(ValueError, match="python -m model convert"):
        check_checkpoint_matches(model, tmp_path / "ogl")
    assert main(["convert", str(tmp_path / "ogl"), str(tmp_path / "hf")]) == 0
    check_checkpoint_matches(model, tmp_path / "hf")


def test_a_tied_head_that_differs_from_the_embeddings_is_refused(tmp_path):
    """A single process (plain tensors) goes through the same path."""
    from safetensors.torch import load_file, save_file

    random_checkpoint(tmp_path / "ckpt", tie=True)
    file = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(file)
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    model = InternVL3(read_config(tmp_path / "ckpt"))
    load_weights_distributed(model, tmp_path / "ckpt")  # equal: loads
    assert torch.equal(model.language.embed_tokens.weight, tensors["language_model.model.embed_tokens.weight"])
    tensors["language_model.lm_head.weight"] += 1
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="differs from its embeddings"):
        load_weights_distributed(model, tmp_path / "ckpt")


def test_the_slice_reader_reads_what_safetensors_maps(tmp_path):
    """read_slice (positional reads of the rows a slice spans) gives safetensors' own slices, for every
    dtype the checkpoints use, scalars and empty slices included; a truncated file is an error naming it."""
    import random

    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.slice_reader import read_header, read_slice

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, 3, generator=generator),
        "bf16": torch.randn(9, 4, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(6, generator=generator).to(torch.float16),
        "i64": torch.randint(-10**12, 10**12, (5, 2), generator=generator),
        "scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    data_start, header = read_header(path)
    rng = random.Random(0)
    with safe_open(path, framework="pt") as mapped, open(path, "rb", buffering=0) as handle:
        for name, tensor in tensors.items():
            for _ in range(20):
                offsets = [rng.randint(0, size) for size in tensor.shape]
                lengths = [rng.randint(0, size - offset) for size, offset in zip(tensor.shape, offsets)]
                expected = mapped.get_slice(name)[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
                got = read_slice(handle, data_start, header[name], offsets, lengths)
                assert got.dtype == tensor.dtype and torch.equal(got, expected), (name, offsets, lengths)
    with open(path, "r+b") as handle:
        handle.truncate(data_start + 16)
    with open(path, "rb", buffering=0) as handle, pytest.raises(OSError, match="truncated"):
        read_slice(handle, data_start, header["f32"], [0, 0, 0], [7, 5, 3])
