"""A torch.distributed.checkpoint storage reader for transformers-layout safetensors checkpoints that reads
each rank's slices with positional reads instead of mapping the files.

DCP's HuggingFaceStorageReader takes each slice through safetensors' ``get_slice`` over a memory map: the
pages it touches count in the process's resident memory while the load runs (a rank's share of the file on
top of its shards). SliceReader plans exactly as that reader does (its metadata and load plan) and reads
each requested slice as the contiguous run of rows its first dimension spans (the other dimensions are cut
from that run in memory), into a buffer of that size, then copies it into the destination shard.
"""

from __future__ import annotations

import json
import math
import struct

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.futures import Future

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(path: str) -> tuple[int, dict]:
    """(byte offset of the data section, name -> header entry {dtype, shape, data_offsets}) of a safetensors file."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_exactly(handle, start: int, buffer: torch.Tensor) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    handle.seek(start)
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            raise OSError(f"{handle.name}: the file ends before byte {start + len(view)} (truncated checkpoint)")
        done += count


def read_slice(handle, data_start: int, entry: dict, offsets, lengths) -> torch.Tensor:
    """The slice [offsets, offsets + lengths) of a tensor stored at ``entry`` in the open file ``handle``."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{handle.name}: unsupported safetensors dtype {entry['dtype']!r}")
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"])
    if not shape:  # a scalar
        offsets, lengths, shape = [0], [1], [1]
    row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(lengths[0] * row_bytes, dtype=torch.uint8)
    if buffer.numel():
        _read_exactly(handle, data_start + entry["data_offsets"][0] + offsets[0] * row_bytes, buffer)
    tensor = buffer.view(dtype).reshape(lengths[0], *shape[1:])
    for dim in range(1, len(shape)):
        tensor = tensor.narrow(dim, offsets[dim], lengths[dim])
    return tensor.reshape(entry["shape"]) if not entry["shape"] else tensor


class SliceReader(HuggingFaceStorageReader):
    """HuggingFaceStorageReader whose reads are positional reads of the requested rows (module docstring)."""

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for path, items in per_file.items():
            data_start, header = read_header(path)
            with open(path, "rb", buffering=0) as handle:
                for item in items:
                    tensor = read_slice(handle, data_start, header[item.storage_index.fqn], item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != tensor.size():
                        raise ValueError(f"{path}: {item.storage_index.fqn}: a slice of {tuple(tensor.shape)} for a "
                                         f"destination of {tuple(target.shape)}")
                    target.copy_(tensor)
                    planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done
