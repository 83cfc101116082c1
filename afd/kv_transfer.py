"""Moving a prompt's KV cache from a prefill rank to a decode attention rank.

The sender gathers the prompt's cached rows (token order, every layer) out of its own blocks
into one contiguous buffer and sends it with ``torch.distributed.isend``; the receiver, which
allocated blocks first (admission), receives into a buffer of the same shape and scatters the
rows into its own block table. Token order on the wire makes the two sides' block sizes
independent. "Every layer" is every layer cache both sides hold: with MTP drafts the MTP
layer's is the last (L + 1 layers, both sides load the MTP layer), so its KV travels in the
same message. Each transfer carries its own tag, and every wait has a deadline: a transfer that
does not finish in time ends its request with an error and frees the blocks on both sides.
The buffer has the caches' dtype, FP8 with kv_cache_dtype "fp8" (half of bf16's bytes): both
sides allocate their caches from one engine config, so the dtypes agree. Layer caches of
different widths (GLM-5's "shared" DSA layers hold no indexer key; each DeepSeek-V4 layer
type has its own row) go as one flat buffer, layer after layer, each layer's rows in token
order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afd.sequence import CoreRequest


def token_slots(block_ids: list[int], num_tokens: int, block_size: int,
                device: torch.device) -> torch.Tensor:
    """Flat cache slots of the first ``num_tokens`` tokens of a block table. [N] int64."""
    pos = torch.arange(num_tokens)
    blocks = torch.tensor(block_ids, dtype=torch.long)[pos // block_size]
    return (blocks * block_size + pos % block_size).to(device)


def _token_view(cache: torch.Tensor) -> torch.Tensor:
    """A layer cache as rows per token slot: MLA [slots, D]; GQA [2, slots, kvh, hd]."""
    if cache.dim() == 3:
        return cache.view(-1, cache.shape[-1])
    return cache.view(2, -1, *cache.shape[3:])


def _uniform(caches: list[torch.Tensor]) -> bool:
    """Do all layer caches have one shape (every model but GLM-5 with shared DSA layers and
    DeepSeek-V4 with more than one layer type)?"""
    return all(c.shape == caches[0].shape for c in caches)


def gather_kv(caches: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """Rows of ``slots`` from every layer, stacked: [layers, N, D] (MLA) or [layers, 2, N, ...];
    MLA / V4 layers of different widths: flat, [N * sum of D], layer after layer."""
    if not _uniform(caches):
        return torch.cat([_token_view(c)[slots].reshape(-1) for c in caches])
    rows = []
    for cache in caches:
        view = _token_view(cache)
        rows.append(view[slots] if cache.dim() == 3 else view[:, slots])
    return torch.stack(rows)


def scatter_kv(caches: list[torch.Tensor], slots: torch.Tensor, data: torch.Tensor) -> None:
    """Inverse of gather_kv into another block table. ``data`` may be in host memory (a
    transfer staged through the host: ``wire_device``); each layer's rows go to the cache's
    device."""
    if not _uniform(caches):  # flat, layer after layer
        data = data.split([slots.numel() * c.shape[-1] for c in caches])
        data = [d.view(slots.numel(), c.shape[-1]) for d, c in zip(data, caches, strict=True)]
    for cache, rows in zip(caches, data):
        view = _token_view(cache)
        rows = rows.to(cache.device)
        if cache.dim() == 3:
            view[slots] = rows
        else:
            view[:, slots] = rows


def transfer_shape(caches: list[torch.Tensor], num_tokens: int) -> tuple[int, ...]:
    if not _uniform(caches):
        return (num_tokens * sum(c.shape[-1] for c in caches),)
    cache = caches[0]
    if cache.dim() == 3:
        return (len(caches), num_tokens, cache.shape[-1])
    return (len(caches), 2, num_tokens, *cache.shape[3:])


class Completion:
    """Whether a posted isend/irecv finished. gloo's point-to-point ``Work.is_completed`` never
    turns true, so a daemon thread blocks in ``wait`` (bounded by the process group's timeout)
    and flags the outcome for the rank's loop to poll. A CUDA buffer's transfer (NCCL, ranks
    with their own GPUs: ``afd.workers.backend_for``) is done only once its device has run it:
    NCCL's ``wait`` returns at once, having only made the device's current stream wait for it
    (the scatter after it is ordered, but nothing was done yet), so the thread then
    synchronizes the buffer's device. Flagged at the ``wait``, a transfer's seconds counted
    its posting, and one whose peer never sent was taken as done at once: its deadline never
    fired, and the rank's next synchronizing call hung behind it."""

    def __init__(self, work, device: torch.device | None = None) -> None:
        self.done = threading.Event()
        self.error: str | None = None
        threading.Thread(target=self._wait, args=(work, device), daemon=True,
                         name="afd-kv-transfer").start()

    def _wait(self, work, device: torch.device | None) -> None:
        try:
            work.wait()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # timed out or the peer died
            self.error = f"{type(exc).__name__}: {exc}"
        self.done.set()

    def is_completed(self) -> bool:
        return self.done.is_set() and self.error is None


@dataclass
class Pull:
    """A finished prefill waiting for this decode rank to have room (front -> decode rank)."""

    request: CoreRequest
    first_token: int
    num_kv_tokens: int
    src: int  # global rank of the prefill rank holding the KV
    tag: int  # torch.distributed tag for this transfer
    drafts: list[int] = field(default_factory=list)  # MTP: the drafts (1 to k) after first_token
    waited: bool = False  # had to wait for blocks at least once


@dataclass
class Receiving:
    pull: Pull
    block_ids: list[int]
    buffer: torch.Tensor
    work: Completion
    started: float = field(default_factory=time.monotonic)


@dataclass
class Sending:
    request_id: str
    buffer: torch.Tensor
    work: Completion
    started: float = field(default_factory=time.monotonic)


def post_send(caches: list[torch.Tensor], block_ids: list[int], num_tokens: int,
              block_size: int, dst: int, tag: int, request_id: str) -> Sending:
    slots = token_slots(block_ids, num_tokens, block_size, caches[0].device)
    return send_buffer(gather_kv(caches, slots).contiguous(), dst, tag, request_id)


def sync_device(device: torch.device, backend: str) -> torch.device | None:
    """The device a transfer's ``Completion`` synchronizes after ``wait``: a CUDA buffer's under
    NCCL only. gloo's ``wait`` has already blocked until the data moved (through the host), and
    a device-wide synchronize there would only hold the flag behind the forward in flight (and
    is not allowed while another thread captures a CUDA graph)."""
    return device if device.type == "cuda" and "nccl" in backend else None


def wire_device(device: torch.device, backend: str) -> torch.device:
    """Where a transfer's buffer lives for a cache on ``device``: the cache's device, except a
    CUDA cache under gloo alone (ranks sharing one GPU: ``afd.workers.backend_for``), whose
    buffer is staged in host memory. gloo's point-to-point send/recv hands the tensor's address
    to its TCP transport as host memory (no CUDA path, unlike its collectives), so a CUDA
    buffer there fails or corrupts the transfer; as afd.rebalance stages its expert moves."""
    if device.type == "cuda" and "nccl" not in backend:
        return torch.device("cpu")
    return device


def send_buffer(buffer: torch.Tensor, dst: int, tag: int, request_id: str) -> Sending:
    backend = dist.get_backend()
    buffer = buffer.to(wire_device(buffer.device, backend))
    return Sending(request_id, buffer,
                   Completion(dist.isend(buffer, dst, tag=tag),
                              sync_device(buffer.device, backend)))


def post_recv(caches: list[torch.Tensor], pull: Pull, block_ids: list[int]) -> Receiving:
    backend = dist.get_backend()
    buffer = torch.empty(transfer_shape(caches, pull.num_kv_tokens), dtype=caches[0].dtype,
                         device=wire_device(caches[0].device, backend))
    return Receiving(pull, block_ids, buffer,
                     Completion(dist.irecv(buffer, pull.src, tag=pull.tag),
                                sync_device(buffer.device, backend)))
