"""Safetensors checkpoints of InternVL3 in two layouts, without transformers:

'hf'        transformers' InternVLForConditionalGeneration. In memory its names are ``model.vision_tower.*``,
            ``model.multi_modal_projector.{layer_norm,linear_1,linear_2}.*``, ``model.language_model.*`` and
            ``lm_head.*``; its save_pretrained writes them in the older llava-style form (``vision_tower.*``,
            ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``), which is
            what this module writes too. Both forms load.
'opengvlab' the original InternVLChatModel: ``vision_model.*`` with one fused ``attn.qkv`` per layer,
            ``mlp1.{0,1,3}`` (LayerNorm, Linear, Linear), ``language_model.model.*``, ``language_model.lm_head``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import struct
from typing import Iterable, Iterator, Optional, Union

import torch

from .config import InternVL3Config
from .slice_reader import SAFETENSORS_DTYPES, SliceReader

LAYOUTS = ("hf", "opengvlab")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # one file of a checkpoint in several
HEAD = "language.lm_head.weight"
EMBEDDINGS = "language.embed_tokens.weight"
_HF_HEAD = "language_model.lm_head.weight"  # HEAD as the 'hf' layout writes it
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


# ---- name rules: (this model's prefix, the layout's prefix); {n} is a layer index. A name maps by its first
# matching rule, keeping the rest of the name (".weight", ".bias") unchanged.

_TEXT_LAYER_RULES = [
    ("language.layers.{n}.input_norm.", "layers.{n}.input_layernorm."),
    ("language.layers.{n}.post_attention_norm.", "layers.{n}.post_attention_layernorm."),
    ("language.layers.{n}.", "layers.{n}."),
    ("language.embed_tokens.", "embed_tokens."),
    ("language.norm.", "norm."),
]

_HF_RULES = [
    ("vision.embeddings.cls_token", "model.vision_tower.embeddings.cls_token"),
    ("vision.embeddings.patch_embedding.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    ("vision.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision.layers.{n}.attn.out_proj.", "model.vision_tower.encoder.layer.{n}.attention.projection_layer."),
    ("vision.layers.{n}.attn.", "model.vision_tower.encoder.layer.{n}.attention."),
    ("vision.layers.{n}.norm1.", "model.vision_tower.encoder.layer.{n}.layernorm_before."),
    ("vision.layers.{n}.norm2.", "model.vision_tower.encoder.layer.{n}.layernorm_after."),
    ("vision.layers.{n}.ls1", "model.vision_tower.encoder.layer.{n}.lambda_1"),
    ("vision.layers.{n}.ls2", "model.vision_tower.encoder.layer.{n}.lambda_2"),
    ("vision.layers.{n}.mlp.", "model.vision_tower.encoder.layer.{n}.mlp."),
    ("vision.final_norm.", "model.vision_tower.layernorm."),
    ("projector.norm.", "model.multi_modal_projector.layer_norm."),
    ("projector.", "model.multi_modal_projector."),
    ("language.lm_head.", "lm_head."),
] + [(ours, "model.language_model." + theirs) for ours, theirs in _TEXT_LAYER_RULES]

# q/k/v of the vision layers are fused into attn.qkv in this layout (handled apart from the rules).
_OPENGVLAB_RULES = [
    ("vision.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision.embeddings.patch_embedding.", "vision_model.embeddings.patch_embedding."),
    ("vision.embeddings.position_embedding", "vision_model.embeddings.position_embedding"),
    ("vision.layers.{n}.attn.out_proj.", "vision_model.encoder.layers.{n}.attn.proj."),
    ("vision.layers.{n}.", "vision_model.encoder.layers.{n}."),
    ("projector.norm.", "mlp1.0."),
    ("projector.linear_1.", "mlp1.1."),
    ("projector.linear_2.", "mlp1.3."),
    ("language.lm_head.", "language_model.lm_head."),
] + [(ours, "language_model.model." + theirs) for ours, theirs in _TEXT_LAYER_RULES]

_QKV = re.compile(r"^vision\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")
_FUSED_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
# Buffers older checkpoints may carry that this model computes itself.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _compile(template: str) -> tuple[re.Pattern, str]:
    pattern = re.escape(template).replace(re.escape("{n}"), r"(\d+)")
    return re.compile("^" + pattern), template


def _compiled(rules, reverse: bool) -> list:
    return [(_compile(theirs if reverse else ours), ours if reverse else theirs) for ours, theirs in rules]


_RULES = {
    ("hf", False): _compiled(_HF_RULES, False),
    ("hf", True): _compiled(_HF_RULES, True),
    ("opengvlab", False): _compiled(_OPENGVLAB_RULES, False),
    ("opengvlab", True): _compiled(_OPENGVLAB_RULES, True),
}


def _rename(name: str, layout: str, reverse: bool) -> Optional[str]:
    for (pattern, _), target in _RULES[(layout, reverse)]:
        match = pattern.match(name)
        if match:
            renamed = target.replace("{n}", match.group(1)) if match.groups() else target
            return renamed + name[match.end():]
    return None


def _hf_in_memory_name(name: str) -> str:
    """transformers' on-disk (llava-style) InternVL names -> its in-memory names."""
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    for prefix in ("language_model.", "vision_tower.", "multi_modal_projector."):
        if name.startswith(prefix):
            return "model." + name
    return name


def _on_disk_hf_name(name: str) -> str:
    """The inverse of ``_hf_in_memory_name``: the names transformers' save_pretrained writes."""
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model."):
        return name[len("model."):]
    return name


# ---- state dict conversion


def to_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """This model's state dict -> the names (and fused qkv) of ``layout``, as written on disk."""
    _check_layout(layout)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if layout == "opengvlab":
            match = _QKV.match(name)
            if match:
                fused.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = tensor
                continue
        renamed = _rename(name, layout, reverse=False)
        if renamed is None:
            raise ValueError(f"{name} has no counterpart in the {layout!r} layout")
        out[_on_disk_hf_name(renamed) if layout == "hf" else renamed] = tensor
    for (layer, kind), parts in fused.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def from_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict in ``layout`` -> this model's names. ValueError names unknown keys."""
    _check_layout(layout)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if _IGNORED.search(name):
            continue
        if layout == "opengvlab":
            match = _FUSED_QKV.match(name)
            if match:
                for kind, part in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"vision.layers.{match.group(1)}.attn.{kind}_proj.{match.group(2)}"] = part
                continue
        renamed = _rename(_hf_in_memory_name(name) if layout == "hf" else name, layout, reverse=True)
        if renamed is None:
            unknown.append(name)
        else:
            out[renamed] = tensor
    if unknown:
        raise ValueError(f"unexpected keys in a {layout!r} checkpoint: {_some(unknown)}")
    return out


def detect_layout(names: Iterable[str]) -> str:
    """'opengvlab' when the names are InternVLChatModel's (vision_model.*, mlp1.*), else 'hf'."""
    for name in names:
        if name.startswith(("vision_model.", "mlp1.")):
            return "opengvlab"
    return "hf"


# ---- files


def read_config(path: Union[str, os.PathLike]) -> InternVL3Config:
    return InternVL3Config.from_hf(os.path.join(os.fspath(path), CONFIG_NAME))


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")


def read_tensors(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a folder's safetensors files, one file open at a time."""
    from safetensors import safe_open

    for file in _weight_files(os.fspath(path)):
        with safe_open(file, framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_pretrained(cls, path, *, dtype: Optional[torch.dtype] = None, device=None):
    """Build ``cls`` (InternVL3) from a checkpoint folder of either layout (see the module docstring)."""
    folder = os.fspath(path)
    config = read_config(folder)
    device = torch.device(device) if device is not None else torch.device("cpu")
    raw = dict(read_tensors(folder, device))
    state = from_layout(raw, detect_layout(raw))
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if config.text.tie_word_embeddings and HEAD in state:
        # transformers' rule: a checkpoint holding both matrices with different values is not tied.
        if not torch.equal(state[HEAD], state[EMBEDDINGS]):
            config.text.tie_word_embeddings = False
        else:
            del state[HEAD]
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(tensor.shape) for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    _check_names_and_shapes(folder, expected, {name: tuple(tensor.shape) for name, tensor in state.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if config.text.tie_word_embeddings:
        model.language.lm_head.weight = model.language.embed_tokens.weight
    return model


def save_pretrained(model, path, *, layout: str = "hf", max_shard_size: int = 5 * 1024**3) -> None:
    """Write ``model`` (InternVL3) as config.json + safetensors in ``layout``, sharded above ``max_shard_size``."""
    from safetensors.torch import save_file

    _check_layout(layout)
    _check_shard_size(max_shard_size)
    config: InternVL3Config = model.config
    if layout == "opengvlab" and config.vision.final_norm:
        raise ValueError("the OpenGVLab layout has no final vision LayerNorm (config.vision.final_norm)")
    state = model.state_dict()
    if config.text.tie_word_embeddings:
        state.pop(HEAD)  # the same storage as the embeddings: written once, as transformers does
    for name, tensor in state.items():
        if tensor.is_meta:
            raise ValueError(f"cannot save a model on the meta device ({name} has no data)")
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in to_layout(state, layout).items()}

    folder = os.fspath(path)
    _clear_weights(folder)
    _write_config(folder, config, layout, next(iter(tensors.values())).dtype if tensors else torch.float32)
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}
    files = _split_into_files(sizes, max_shard_size)
    for file, names in files:
        save_file({name: tensors[name] for name in names}, os.path.join(folder, file), metadata={"format": "pt"})
    _write_index(folder, files, sizes)


def _check_shard_size(max_shard_size: int) -> None:
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")


def _split_into_files(sizes: dict[str, int], max_shard_size: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each weights file of tensors of ``sizes`` (name -> bytes): the names in
    sorted order, a new file begun where the next tensor would take a file above ``max_shard_size``; one file
    is model.safetensors, several model-0000i-of-0000N.safetensors (transformers' names)."""
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for name in sorted(sizes):
        if groups[-1] and group_bytes + sizes[name] > max_shard_size:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += sizes[name]
    if len(groups) == 1:
        return [(WEIGHTS_NAME, groups[0])]
    return [(f"model-{index:05d}-of-{len(groups):05d}.safetensors", names) for index, names in enumerate(groups, start=1)]


def _clear_weights(folder: str) -> None:
    """Create ``folder`` and remove the weights files and index a checkpoint written there before left."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_FILE.match(name):
            os.remove(os.path.join(folder, name))


def _write_index(folder: str, files: list[tuple[str, list[str]]], sizes: dict[str, int]) -> None:
    """model.safetensors.index.json (each tensor's file and the total bytes) of a checkpoint of several files."""
    if len(files) == 1:
        return
    weight_map = {name: file for file, names in files for name in names}
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, handle, indent=2, sort_keys=True)


def _write_safetensors(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file of the tensors ``entries`` describe ((name, dtype, shape), in file order), each
    written as ``tensors`` yields it, in that order: one tensor in memory at a time. The header is the one
    safetensors' save_file writes for tensors of one dtype (an 8-byte length, compact JSON with {"format":
    "pt"} as its metadata, padded with spaces to a multiple of 8 bytes), so the bytes are save_file's."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors:
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # freed before the next one is made


def _check_names_and_shapes(folder: str, expected: dict, found: dict) -> None:
    """ValueError naming what the checkpoint in ``folder`` lacks, has beyond the config, or holds in another
    shape (name -> shape dicts, under the same names)."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"the checkpoint in {folder} lacks {_some(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(f"the checkpoint in {folder} has tensors this config does not use: {_some(unexpected)}")
    for name, shape in sorted(expected.items()):
        if found[name] != shape:
            raise ValueError(f"{name}: the checkpoint's shape {found[name]} is not the config's {shape}")


def _write_config(folder: str, config: InternVL3Config, layout: str, dtype: torch.dtype) -> None:
    """config.json of a checkpoint in ``layout`` whose tensors are ``dtype``."""
    config_dict = config.to_hf() if layout == "hf" else config.to_opengvlab()
    config_dict["dtype"] = config_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config_dict, handle, indent=2, sort_keys=True)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- sharded models: each rank reads only its own shards and writes the files dealt to it


def checkpoint_shapes(path: Union[str, os.PathLike]) -> dict[str, tuple[int, ...]]:
    """The on-disk name -> shape of every tensor of a checkpoint folder, from the safetensors headers (no
    tensor data read). FileNotFoundError names a shard file its index lists but the folder lacks."""
    from safetensors import safe_open

    folder = os.fspath(path)
    shapes = {}
    for file in _weight_files(folder):
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: listed in {os.path.join(folder, INDEX_NAME)} but missing")
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _sharded_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict as the 'hf' layout names it on disk (tensors may be DTensors: DCP reads and
    writes each rank's shards of them); a tied head is the embeddings' tensor, written once."""
    state = model.state_dict()
    if model.config.text.tie_word_embeddings:
        state.pop(HEAD)
    return to_layout(state, "hf")


def check_checkpoint_matches(model, path: Union[str, os.PathLike]) -> dict[str, tuple[int, ...]]:
    """ValueError, before anything is read, when the checkpoint's tensor names or shapes are not the model's:
    names the tensor (as the checkpoint spells it) and both shapes. Only the transformers ('hf') layout
    loads into a sharded model. Returns the checkpoint's shapes (checkpoint_shapes)."""
    folder = os.fspath(path)
    shapes = checkpoint_shapes(folder)
    if detect_layout(shapes) != "hf":
        raise ValueError(f"{folder} is in the OpenGVLab layout; a sharded start reads the transformers layout: "
                         "convert it once with `python -m model convert SOURCE TARGET`")
    expected = {name: tuple(tensor.shape) for name, tensor in _sharded_state(model).items()}
    on_disk = {_on_disk_hf_name(_hf_in_memory_name(name)): shape for name, shape in shapes.items() if not _IGNORED.search(name)}
    if model.config.text.tie_word_embeddings:
        on_disk.pop(_HF_HEAD, None)  # compared with the embeddings when loaded (_check_tied_head)
    _check_names_and_shapes(folder, expected, on_disk)
    return shapes


def load_weights_distributed(model, path: Union[str, os.PathLike]) -> None:
    """Fill a model whose parameters are sharded (DTensors after internvl3_engine.parallel.parallelize, on
    their devices; plain tensors load too) from a transformers-layout checkpoint folder: each rank reads
    only the slices it holds (torch.distributed.checkpoint with model.slice_reader.SliceReader: DCP's
    HuggingFaceStorageReader reading the slices with positional reads instead of a memory map),
    converting to the parameters' dtype. Names and shapes are checked first (check_checkpoint_matches).
    A checkpoint that stores a head beside the embeddings that the config ties must hold the same values
    (compared shard by shard; ValueError otherwise: untie them in its config.json)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = os.fspath(path)
    shapes = check_checkpoint_matches(model, folder)
    alone = not dist.is_initialized()
    dcp.load(_sharded_state(model), storage_reader=SliceReader(folder), no_dist=alone)
    if model.config.text.tie_word_embeddings and _HF_HEAD in shapes:
        _check_tied_head(model, folder, alone)


def _check_tied_head(model, folder: str, alone: bool) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    embeddings = model.language.embed_tokens.weight.detach()
    head = torch.empty_like(embeddings)
    dcp.load({_HF_HEAD: head}, storage_reader=SliceReader(folder), no_dist=alone)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in (head, embeddings)]
    same = torch.tensor(float(torch.equal(*local)), device=embeddings.device)
    if not alone:
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        raise ValueError(f"{folder}: the checkpoint's {_HF_HEAD} differs from its embeddings, but its config ties "
                         "them (tie_word_embeddings): set tie_word_embeddings to false in its config.json")


def save_weights_distributed(model, path: Union[str, os.PathLike], *, max_shard_size: int = 5 * 1024**3) -> None:
    """Write a sharded model (DTensors after internvl3_engine.parallel.parallelize; plain tensors write too)
    as a transformers-layout checkpoint in ``path``: config.json and the files save_pretrained writes (byte
    for byte when the tensors share one dtype). No rank holds the model: the weights files are dealt to the
    ranks in turn (file i to rank i mod W), and tensor by tensor every rank takes part in gathering the whole
    tensor from its shards (DTensor.full_tensor, a collective) while the rank of its file appends it to the
    file. A rank holds its shards and one whole tensor (two while gloo gathers it: its all-gather copies the
    result; on CUDA the gather is on the device and the file's rank copies the tensor to the host). Call it
    on every rank."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    _check_shard_size(max_shard_size)
    folder = os.fspath(path)
    alone = not dist.is_initialized()
    rank, world = (0, 1) if alone else (dist.get_rank(), dist.get_world_size())
    state = _sharded_state(model)
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in state.items()}
    files = _split_into_files(sizes, max_shard_size)
    if rank == 0:
        _clear_weights(folder)
    if not alone:
        dist.barrier()
    for index, (file, names) in enumerate(files):
        whole = (state[name].full_tensor() if isinstance(state[name], DTensor) else state[name] for name in names)
        if index % world == rank:
            _write_safetensors(os.path.join(folder, file), [(name, state[name].dtype, tuple(state[name].shape)) for name in names], whole)
        else:
            collections.deque(whole, maxlen=0)  # this rank's part in each gather, each tensor dropped at once
    if rank == 0:
        _write_index(folder, files, sizes)
        _write_config(folder, model.config, "hf", next(iter(model.parameters())).dtype)
    if not alone:
        dist.barrier()
