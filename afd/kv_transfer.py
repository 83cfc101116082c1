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

A hybrid linear-attention model's (models.hybrid) message also carries the sequence's state
slot: each linear layer's conv state (run dtype) and recurrent state (fp32) as they stood after
the prompt, which the decode rank copies into the state slot it reserved at admission. KV and
states have different dtypes, so that message is bytes (uint8): the full-attention layers' KV
as above, then per linear layer its conv then its recurrent state, each part starting on a
16-byte boundary (``_parts``). One message, one tag: the deadline, the error paths, the filler
a cancelled receive gets and the buffer sizes cover the states as they cover the KV. At
Qwen3-Next-80B's dims (36 linear layers; conv 8192 x 3 bf16, recurrent 32 x 128 x 128 fp32)
that is 73.7 MiB per sequence beside its KV (docs/limits.md#msg-size-caps).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afd.sequence import CoreRequest

_ALIGN = 16  # bytes: where each part of a hybrid model's message starts (any dtype's view)


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


def _is_states(cache) -> bool:
    """A hybrid model's linear layer's state slots (``models.hybrid.LinearStates``: its conv
    and recurrent tensors), told apart by its fields (that module is not imported here)."""
    return hasattr(cache, "recurrent") and hasattr(cache, "conv")


def kv_layers(caches: list) -> list[torch.Tensor]:
    """The layer caches that hold KV rows: all of them but a hybrid model's linear layers'
    state slots."""
    return [c for c in caches if not _is_states(c)]


def state_layers(caches: list) -> list:
    """A hybrid model's linear layers' state slots (``LinearStates``), in layer order; []."""
    return [c for c in caches if _is_states(c)]


def _parts(caches: list, num_tokens: int) -> list[tuple[int, tuple[int, ...], torch.dtype]]:
    """A hybrid model's message: (byte offset, shape, dtype) of its KV, then of each linear
    layer's conv and recurrent state (one slot's)."""
    kv = kv_layers(caches)
    parts = [(kv_shape(kv, num_tokens), kv[0].dtype)]
    for states in state_layers(caches):
        parts += [(tuple(states.conv.shape[1:]), states.conv.dtype),
                  (tuple(states.recurrent.shape[1:]), states.recurrent.dtype)]
    out, offset = [], 0
    for shape, dtype in parts:
        out.append((offset, shape, dtype))
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    out.append((offset, (), torch.uint8))  # the end
    return out


def transfer_shape(caches: list, num_tokens: int) -> tuple[int, ...]:
    """The shape of a transfer's buffer (``transfer_dtype`` its dtype): a hybrid model's is
    bytes, its KV and states (``_parts``)."""
    if state_layers(caches):
        return (_parts(caches, num_tokens)[-1][0],)
    return kv_shape(caches, num_tokens)


def transfer_dtype(caches: list) -> torch.dtype:
    return torch.uint8 if state_layers(caches) else caches[0].dtype


def transfer_buffer(caches: list, num_tokens: int, device: torch.device,
                    zeros: bool = False) -> torch.Tensor:
    """An empty (or zeroed: a filler's) buffer of a transfer's shape and dtype on ``device``."""
    make = torch.zeros if zeros else torch.empty
    return make(transfer_shape(caches, num_tokens), dtype=transfer_dtype(caches), device=device)


def gather_transfer(caches: list, slots: torch.Tensor, state_slot: int | None) -> torch.Tensor:
    """A transfer's buffer: ``gather_kv`` of the KV layers; a hybrid model's also holds state
    slot ``state_slot`` of each linear layer, as bytes (``_parts``)."""
    kv = gather_kv(kv_layers(caches), slots).contiguous()
    states = state_layers(caches)
    if not states:
        return kv
    if state_slot is None:
        raise ValueError("a hybrid model's KV transfer needs the sequence's state slot")
    parts = _parts(caches, slots.numel())
    buffer = torch.empty(parts[-1][0], dtype=torch.uint8, device=kv.device)
    tensors = [kv] + [t[state_slot] for s in states for t in (s.conv, s.recurrent)]
    for (offset, shape, dtype), tensor in zip(parts, tensors):
        _part(buffer, offset, shape, dtype).copy_(tensor)
    return buffer


def scatter_states(caches: list, num_tokens: int, buffer: torch.Tensor, state_slot: int) -> None:
    """A hybrid model's received states (``buffer``, as ``gather_transfer`` packed it) into
    each linear layer's state slot ``state_slot``."""
    parts = _parts(caches, num_tokens)[1:-1]
    for i, states in enumerate(state_layers(caches)):
        for (offset, shape, dtype), tensor in zip(parts[2 * i:2 * i + 2],
                                                  (states.conv, states.recurrent)):
            tensor[state_slot].copy_(_part(buffer, offset, shape, dtype))


def transfer_kv(caches: list, num_tokens: int, buffer: torch.Tensor) -> torch.Tensor:
    """The KV of a received buffer, as ``scatter_kv`` takes it (the whole buffer but a hybrid
    model's, whose KV is its first part)."""
    if not state_layers(caches):
        return buffer
    offset, shape, dtype = _parts(caches, num_tokens)[0]
    return _part(buffer, offset, shape, dtype)


def _part(buffer: torch.Tensor, offset: int, shape: tuple[int, ...],
          dtype: torch.dtype) -> torch.Tensor:
    return buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def kv_shape(caches: list[torch.Tensor], num_tokens: int) -> tuple[int, ...]:
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
    state_slot: int | None = None  # a hybrid model's: the slot its states go to, held till then


@dataclass
class Sending:
    request_id: str
    buffer: torch.Tensor
    work: Completion
    started: float = field(default_factory=time.monotonic)


def post_send(caches: list, block_ids: list[int], num_tokens: int, block_size: int, dst: int,
              tag: int, request_id: str, state_slot: int | None = None) -> Sending:
    """Send a prompt's KV (and a hybrid model's states, from ``state_slot``): the buffer is a
    copy, so the caller may free the blocks and the slot as soon as this returns."""
    slots = token_slots(block_ids, num_tokens, block_size, kv_layers(caches)[0].device)
    return send_buffer(gather_transfer(caches, slots, state_slot), dst, tag, request_id)


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


def post_recv(caches: list, pull: Pull, block_ids: list[int]) -> Receiving:
    backend = dist.get_backend()
    buffer = transfer_buffer(caches, pull.num_kv_tokens,
                             wire_device(kv_layers(caches)[0].device, backend))
    return Receiving(pull, block_ids, buffer,
                     Completion(dist.irecv(buffer, pull.src, tag=pull.tag),
                                sync_device(buffer.device, backend)))
