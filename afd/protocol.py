"""Control messages between the front end and the ranks: msgpack over ZeroMQ sockets.

Only plain data crosses a socket (maps, lists, numbers, strings); nothing is unpickled.
Tensors never travel here: they go through torch.distributed.

Each message is a msgspec Struct: a map whose "t" names its kind (a tagged union). ``ToRank``
are the front end's messages to a prefill or attention rank, ``FromRank`` a rank's to the front
end. The receiver decodes the bytes against the union in one call, which checks every field's
presence, type and range on the way (``CoreOutput`` and ``PromptLogprobs`` travel as arrays,
``SamplingParams`` and ``CoreStats`` as maps of their fields, all checked the same way). A
message that fails is a ``ProtocolError`` naming its kind and the field, before any of it is
used: the receiver logs it with its sender and drops it, failing only the request it names
(``ControlLink.poll`` in afd.workers, ``MultiRankClient._recv`` in afd.layouts); it never
raises out of a rank's or the front end's loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict, Union

import msgspec
from msgspec import Meta, Struct

from afd.core import CoreStats
from afd.sampling_params import SamplingParams, TokenId
from afd.sequence import CoreOutput, CoreRequest

Count = Annotated[int, Meta(ge=0)]  # tokens, blocks, bytes
Rank = Annotated[int, Meta(ge=0)]  # a global rank (the receiver checks it is in the layout)
Tag = Annotated[int, Meta(ge=0, lt=2**31)]  # a KV transfer's torch.distributed tag


class WireRequest(Struct):
    """A ``CoreRequest`` as it crosses a socket (its fields under shorter names)."""

    id: str
    prompt: Annotated[list[TokenId], Meta(min_length=1)]
    params: SamplingParams  # its own checks (``SamplingParams.validate``) run on arrival
    eos: list[TokenId]
    arrival: float
    priority: int = 0
    salt: str | None = None

    @classmethod
    def of(cls, req: CoreRequest) -> WireRequest:
        params = req.params
        if params.extra:  # the caller's, read by no rank: it stays here (as to_dict drops it)
            params = copy.copy(params)
            params.extra = {}
        return cls(req.request_id, req.prompt_token_ids, params, list(req.eos_token_ids),
                   req.arrival_time, req.priority, req.cache_salt)

    def core(self) -> CoreRequest:
        return CoreRequest(self.id, self.prompt, self.params, tuple(self.eos), self.arrival,
                           self.priority, self.salt)


# ---- front end -> prefill or attention rank --------------------------------------------------
class _ToRank(Struct, tag_field="t"):
    pass


class Add(_ToRank, tag="add"):
    """Queue a request (its ``id`` is the placement's wire id: afd.layouts)."""

    req: WireRequest


class Pull(_ToRank, tag="pull"):
    """P/D, to a decode rank: take over a prefilled request, its ``n`` KV tokens from prefill
    rank ``src`` (transfer ``tag``), its first token and the MTP drafts after it."""

    req: WireRequest
    first: TokenId
    drafts: list[TokenId]
    n: Count
    src: Rank
    tag: Tag


class Abort(_ToRank, tag="abort"):
    ids: list[str]


class Release(_ToRank, tag="release"):
    """P/D, to a prefill rank: free a parked request's KV (sent, or no longer wanted)."""

    id: str


class Send(_ToRank, tag="send"):
    """P/D, to a prefill rank: rank ``dst`` has posted the receive of ``id``'s KV."""

    id: str
    dst: Rank
    tag: Tag
    n: Count


class Cancel(_ToRank, tag="cancel"):
    """P/D, to a prefill rank: the receiver gave up on ``id``; complete its receive."""

    id: str
    dst: Rank
    tag: Tag
    n: Count


class Drop(_ToRank, tag="drop"):
    """Fault injection (tests): withhold ``id``'s KV until the receiver gives up."""

    id: str


class ResetPrefixCache(_ToRank, tag="reset_prefix_cache"):
    pass


class ExpertLoadStart(_ToRank, tag="expert_load_start"):
    pass


class ExpertLoadStop(_ToRank, tag="expert_load_stop"):
    pass


class ExpertLoadDump(_ToRank, tag="expert_load_dump"):
    pass


class Rebalance(_ToRank, tag="rebalance"):
    """To every attention rank: switch to this placement (``ExpertPlacement.to_dict``'s fields)
    at the first step every attention rank holds it (afd.rebalance). ``epoch`` numbers the
    rebalances of this engine, from 1; the rank checks the placement against its own."""

    epoch: Annotated[int, Meta(ge=1)]
    num_experts: Annotated[int, Meta(ge=1)]
    slots: list[list[Count]] = []
    layers: list[list[list[Count]]] = []


class Shutdown(_ToRank, tag="shutdown"):
    pass


class Wake(_ToRank, tag="wake"):
    """To every other attention rank when one is sent work (with FFN ranks): an idle cluster's
    attention ranks sleep on their sockets between step votes, and the vote that runs the step
    waits for all of them (``AttentionWorker.run``). It carries nothing."""


ToRank = Union[Add, Pull, Abort, Release, Send, Cancel, Drop, ResetPrefixCache, ExpertLoadStart,
               ExpertLoadStop, ExpertLoadDump, Rebalance, Shutdown, Wake]


@dataclass
class Refused:
    """Not a message: what a rank's link makes of a malformed ``add`` or ``pull`` that names its
    request. The rank answers that request with an error output (it fails alone)."""

    id: str
    reason: str


# ---- rank -> front end -----------------------------------------------------------------------
class _FromRank(Struct, tag_field="t", kw_only=True):
    rank: int = -1  # the sender (ControlLink.send sets it); the front end checks the layout


class RankInfo(TypedDict):
    """What a rank holds (afd.workers.describe)."""

    role: str
    params: list[str]
    param_bytes: Count
    kv_bytes: Count
    num_kv_blocks: Count
    gc_frozen: Count


class Ready(_FromRank, tag="ready"):
    info: RankInfo


class Prefilled(Struct, array_like=True):
    """A prefill rank's request that has its first token and parks its KV: ``num_kv_tokens``
    to move, and the MTP drafts after the first token (none without MTP)."""

    id: str
    num_kv_tokens: Count
    drafts: list[TokenId]


class Out(_FromRank, tag="out"):
    """A step's outputs (the decode output path: every step, a row per running request)."""

    outs: list[CoreOutput]
    stats: CoreStats | None = None  # None only in what is kept of a malformed one
    timers: dict[str, int | float] | None = None  # cumulative stage seconds and step count
    attn: int | None = None
    prefilled: list[Prefilled] = []


class Admitted(_FromRank, tag="admitted"):
    """A decode rank has reserved blocks for ``id`` and posted the receive."""

    id: str
    tag: Tag
    src: Rank
    n: Count


class TransferFailed(_FromRank, tag="transfer_failed"):
    id: str
    src: Rank
    tag: Tag
    n: Count


class Transferred(_FromRank, tag="transferred"):
    id: str
    seconds: float


class ExpertLoad(_FromRank, tag="expert_load"):
    counts: list[list[Count]] | None  # [layers][experts]; None: no record was started


class Rebalanced(_FromRank, tag="rebalanced"):
    """An attention or FFN rank has switched to rebalance ``epoch`` (afd.rebalance), or (an
    attention rank, ``error`` set) refused it; ``seconds`` the switch took on this rank,
    ``moved`` the slots an FFN rank received from others, ``experts`` {MoE layer: the logical
    expert of each of its slots} on an FFN rank."""

    epoch: Annotated[int, Meta(ge=1)]
    seconds: float = 0.0
    moved: Count = 0
    experts: dict[int, list[Count]] = {}
    error: str | None = None


class Heartbeat(_FromRank, tag="hb"):
    pass


class Timers(_FromRank, tag="timers"):
    timers: dict[str, int | float]


class Bye(_FromRank, tag="bye"):
    pass


class Error(_FromRank, tag="error"):
    role: str
    msg: str


FromRank = Union[Ready, Out, Admitted, TransferFailed, Transferred, ExpertLoad, Rebalanced,
                 Heartbeat, Timers, Bye, Error]

_KINDS = {cls.__struct_config__.tag: cls for cls in (*ToRank.__args__, *FromRank.__args__)}


# ---- encoding and decoding -------------------------------------------------------------------
class ProtocolError(ValueError):
    """Bytes that are no well-formed control message. ``kind``: the message's "t" where it has
    one; ``request_id``: the request it names, if any; ``rank``: the sender it claims, if any;
    ``raw``: the message decoded without types (what can be salvaged of it)."""

    def __init__(self, message: str, kind: str | None = None, request_id: str | None = None,
                 rank: int | None = None, raw: Any = None):
        super().__init__(message)
        self.kind, self.request_id, self.rank, self.raw = kind, request_id, rank, raw


# What a decode raises for bad bytes: msgspec's errors, and RecursionError for a message nested
# past the interpreter's limit (msgspec's decoder recurses; a 2 KB message reaches it), or for
# params too deep for their own checks on arrival (SamplingParams.validate)
_DECODE_ERRORS = (msgspec.MsgspecError, RecursionError)

_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(ToRank)
_from_rank = msgspec.msgpack.Decoder(FromRank)


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_rank(data: bytes | memoryview) -> ToRank:
    """A message from the front end; ProtocolError if malformed."""
    try:
        return _to_rank.decode(data)
    except _DECODE_ERRORS as exc:
        raise _explain(data, exc, ToRank) from None


def decode_from_rank(data: bytes | memoryview) -> FromRank:
    """A message from a rank; ProtocolError if malformed (its ``raw`` then holds what a
    malformed ``out`` has left: ``salvage_out``)."""
    try:
        return _from_rank.decode(data)
    except _DECODE_ERRORS as exc:
        raise _explain(data, exc, FromRank) from None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _explain(data: bytes | memoryview, exc: Exception, union: Any) -> ProtocolError:
    """The error for bytes that failed to decode: which kind of message, which field, and what
    of it identifies the sender and the request (taken from the message read without types)."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.MsgspecError:
        return ProtocolError(f"not a control message (no msgpack): {exc}")
    except RecursionError:
        return ProtocolError("not a control message (nested too deeply to read)")
    kind = raw.get("t") if isinstance(raw, dict) else None
    if not isinstance(kind, str):
        return ProtocolError(f"not a control message (a map whose 't' names its kind): {exc}")
    if _KINDS.get(kind) not in union.__args__:
        return ProtocolError(f"control message kind {kind!r} is not one this receiver takes",
                             kind)
    req = raw.get("req")
    request_id = _string(req.get("id")) if isinstance(req, dict) else _string(raw.get("id"))
    rank = raw.get("rank")
    return ProtocolError(f"malformed {kind!r} control message: {exc}", kind, request_id,
                         rank if type(rank) is int else None, raw)


def salvage_out(raw: dict) -> tuple[Out, list[tuple[str | None, str]]]:
    """What is well formed in a malformed ``out`` message (``raw``, decoded without types):
    each output row, prefilled entry, the stats and the timers checked alone, so one bad row
    costs only its own request. Returns the message with the good parts, and (request id where
    the part names one, why) for each bad part."""
    def check(value: Any, typ: Any, what: str) -> Any:
        try:
            return msgspec.convert(value, typ)
        except (msgspec.ValidationError, RecursionError) as exc:
            bad.append((_string(value[0]) if isinstance(value, list) and value else None,
                        f"malformed 'out' control message: {what}: {exc}"))
            return None

    bad: list[tuple[str | None, str]] = []
    outs = raw.get("outs")
    prefilled = raw.get("prefilled", [])
    rows = [check(row, CoreOutput, f"output row {i}")
            for i, row in enumerate(outs if isinstance(outs, list) else [])]
    parked = [check(p, Prefilled, f"prefilled entry {i}")
              for i, p in enumerate(prefilled if isinstance(prefilled, list) else [])]
    stats = check(raw.get("stats"), CoreStats, "stats")
    timers = check(raw.get("timers"), dict[str, int | float] | None, "timers")
    if not isinstance(outs, list) or not isinstance(prefilled, list):
        bad.append((None, "malformed 'out' control message: outs and prefilled must be arrays"))
    msg = Out(outs=[r for r in rows if r is not None], stats=stats, timers=timers,
              prefilled=[p for p in parked if p is not None], rank=raw.get("rank"))
    return msg, bad
