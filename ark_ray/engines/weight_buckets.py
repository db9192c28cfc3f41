"""The flat-bucket format weights travel in, from the learner to the inference engines.

Why its own module, below both sides: the learner's side (ark_ray/train/weight_sync.py) packs
parameters into buckets and the engines (ark_ray/engines/vllm_engine.py) unpack them; both must
agree on where a bucket may be cut (`layer_key`) and how a flat bucket unpacks (`unflatten`), and
on the CUDA IPC handle pair. Keeping that here lets the engines stay below the training code:
nothing under ark_ray/engines imports ark_ray/train or ark_ray/opd.

A bucket is `{"dtype": str, "items": [(name, shape), ...]}` plus its payload: a flat tensor
(`flat`, object-store buckets), or a CUDA IPC handle of one (`handle`, same-GPU buckets).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def layer_key(name: str) -> str:
    """The unit a bucket never splits: a transformer layer (q/k/v and gate/up are fused per layer in
    vLLM, and its layer-wise reload needs every part of a layer in one load), else the module."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def unflatten(bucket: dict, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view of `flat`) for each item of `bucket`, in order."""
    off = 0
    for name, shape in bucket["items"]:
        n = int(torch.Size(shape).numel())
        yield name, flat[off:off + n].view(shape)
        off += n


# ----------------------------------------------------------------------------- CUDA IPC


def share_cuda(flat: torch.Tensor) -> tuple:
    """A picklable handle other processes on the same GPU open without copying (torch's own
    CUDA IPC reduction, the one torch.multiprocessing uses)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(flat)


def open_cuda(handle: tuple) -> torch.Tensor:
    """The tensor behind `handle`, in this process. The device index in the handle is the sender's;
    a receiver that sees the same card under another index (CUDA_VISIBLE_DEVICES) opens it on its
    current device, which is that card (colocated engines only)."""
    func, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()
    return func(*args)


def ipc_items(payload: list[dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor view) over every bucket of an IPC payload, opened in this process."""
    for bucket in payload:
        yield from unflatten(bucket, open_cuda(bucket["handle"]))


# ----------------------------------------------------------------------------- object store


def object_items(refs: Iterable) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over bucket objects in Ray's object store, fetched one at a time (one bucket
    in memory)."""
    import ray

    for ref in refs:
        bucket = ray.get(ref)
        yield from unflatten(bucket, bucket["flat"])


__all__ = ["layer_key", "unflatten", "share_cuda", "open_cuda", "ipc_items", "object_items"]
