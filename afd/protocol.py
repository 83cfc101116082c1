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

Every message is sealed (``Sealer``): a header naming its sender, its receiver and a sequence
number, and an HMAC-SHA256 over header and body under the engine's session key, checked (in
constant time) before a byte of the body is decoded. One that fails, or that repeats or goes
back on its sender's sequence, is logged and dropped. What it covers and what not:
docs/architecture.md, **Control-plane authentication** (and docs/limits.md).
"""

from __future__ import annotations

import copy
import hmac
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, NotRequired, TypedDict, Union

import msgspec
from msgspec import Meta, Struct

from afd.core_stats import CoreStats
from afd.sampling_params import SamplingParams, TokenId
from afd.sequence import CoreOutput, CoreRequest

Count = Annotated[int, Meta(ge=0)]  # tokens, blocks, bytes
Rank = Annotated[int, Meta(ge=0)]  # a global rank (the receiver checks it is in the layout)
Tag = Annotated[int, Meta(ge=0, lt=2**31)]  # a KV transfer's torch.distributed tag
# a block key's digest (afd.block_pool.key_digest): a signed 64-bit int
Digest = Annotated[int, Meta(ge=-2**63, le=2**63 - 1)]
# block digests in one KVEvents (removed and stored together; the rank splits a longer batch
# over several messages): 9 bytes each on the wire, at most 72 KiB a message
MAX_KV_EVENTS = 8192
DigestList = Annotated[list[Digest], Meta(max_length=MAX_KV_EVENTS)]


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
    """To every other attention rank when one is sent work (with FFN ranks), and to every other
    prefill rank with prefill_expert_parallel: an idle cluster's ranks sleep on their sockets
    between step votes, and the vote that runs the step waits for all of them
    (``AttentionWorker.run``, ``PrefillWorker``). It carries nothing."""


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
    # per MoE layer (the MTP layer's last), the logical routed experts held, where a rank
    # holds some (FFN ranks; prefill ranks with prefill_expert_parallel hold a slice)
    expert_ids: NotRequired[list[list[int]]]


class Ready(_FromRank, tag="ready"):
    info: RankInfo


class Prefilled(Struct, array_like=True):
    """A prefill rank's request that has its first token and parks its KV: ``num_kv_tokens``
    to move, and the MTP drafts after the first token (none without MTP)."""

    id: str
    num_kv_tokens: Count
    drafts: list[TokenId]


class KVEvents(Struct, array_like=True):
    """KV cache events of a rank that runs prompts (vLLM's ``BlockRemoved`` / ``BlockStored`` /
    ``AllBlocksCleared``; afd.block_pool.CacheEvents): the block key digests its prefix cache
    (device pool and host tier together) stopped and started holding since its last batch,
    removals first, and ``resets``, how many times it was emptied ever (a batch of a count the
    front end has seen below it follows a reset: the front end forgets what it held first)."""

    resets: Count
    removed: DigestList = []
    stored: DigestList = []


def kv_event_batches(core: Any) -> list[KVEvents]:
    """The KV cache events an ``afd.core.EngineCore`` recorded since the last call, in messages
    of at most MAX_KV_EVENTS digests each (none when it records none)."""
    return [KVEvents(*batch) for batch in core.take_kv_events(MAX_KV_EVENTS)]


def with_kv_events(core: Any, msg: "Out") -> list["Out"]:
    """``msg`` (a step's ``out``) and before it, where ``core``'s KV cache events since the
    last call take more than one batch, an ``out`` of no rows per extra batch: the last batch
    travels in ``msg``, with the outputs (attention and prefill ranks alike)."""
    kv = kv_event_batches(core)
    msg.kv = kv[-1] if kv else None
    return [Out([], msg.stats, kv=extra) for extra in kv[:-1]] + [msg]


class Out(_FromRank, tag="out"):
    """A step's outputs (the decode output path: every step, a row per running request)."""

    outs: list[CoreOutput]
    stats: CoreStats | None = None  # None in what is kept of a malformed one, and in every
    # part but the last of one split by rows (split_out)
    timers: dict[str, int | float] | None = None  # cumulative stage seconds and step count
    attn: int | None = None
    prefilled: list[Prefilled] = []
    kv: KVEvents | None = None  # the step's KV cache events (before its outputs are read)


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
    try:  # dropped whole, naming no request (the router's view of that rank goes stale)
        kv = msgspec.convert(raw.get("kv"), KVEvents | None)
    except (msgspec.ValidationError, RecursionError) as exc:
        kv = None
        bad.append((None, f"malformed 'out' control message: kv: {exc}"))
    if not isinstance(outs, list) or not isinstance(prefilled, list):
        bad.append((None, "malformed 'out' control message: outs and prefilled must be arrays"))
    msg = Out(outs=[r for r in rows if r is not None], stats=stats, timers=timers,
              prefilled=[p for p in parked if p is not None], rank=raw.get("rank"), kv=kv)
    return msg, bad


# ---- authentication --------------------------------------------------------------------------
# A sealed message: MAC (32 bytes) | sender u32 | receiver u32 | stream u64 | sequence u64 |
# body. The MAC is HMAC-SHA256 under the session key over everything after it. The front end
# is FRONT in a header; a rank is its global rank; the stream is random per Sealer.
MAC_BYTES = 32
_HEADER = struct.Struct(">IIQQ")
HEADER_BYTES = MAC_BYTES + _HEADER.size
FRONT = 2**32 - 1
MIN_KEY_BYTES = 16
KEY_ENV = "AFD_CONTROL_KEY"  # the key, in hex, from a process to the ones it starts
KEY_FILE_ENV = "AFD_CONTROL_KEY_FILE"  # the operator's key file (launch/serve.py)
# The largest message the front end sends (an ``add``, or the ``pull`` of the same request, a
# few drafts more): a request whose ``add`` is larger is refused when it is added. 64 MiB holds
# a prompt of 13 million token ids, or the largest SamplingParams the limits allow with room.
MAX_TO_RANK_BYTES = 64 << 20
MAX_ADD_BYTES = MAX_TO_RANK_BYTES - HEADER_BYTES - 4096  # a pull's own fields fit in the rest
# The most one prompt position of prompt logprobs packs to: 21 token ids (5 bytes each as
# msgpack, up to 2**32) and 21 float64 logprobs (9 bytes), the rank, array headers. An output
# row carrying a whole prompt's (they travel with the first token) is at most max_model_len of
# these, beside what its request brought (its id) and a few tokens' logprobs.
PROMPT_LOGPROB_BYTES = 320


def max_from_rank_bytes(max_model_len: int) -> int:
    """The cap on a rank's message: larger than any one output row can be (see
    PROMPT_LOGPROB_BYTES); a step's ``out`` larger than this goes as several (``split_out``)."""
    return MAX_TO_RANK_BYTES + max_model_len * PROMPT_LOGPROB_BYTES + (1 << 20)


class Unsealed(ValueError):
    """Bytes whose seal does not hold: no MAC, a wrong one, for another receiver, or replayed.
    Never decoded."""


def session_key(key: bytes, session: str) -> bytes:
    """The key one engine's messages are sealed with: the secret ``key`` bound to this start's
    random ``session`` id, so a message captured from an earlier start under the same key file
    is refused by a later one."""
    return hmac.digest(key, b"afd-control-session:" + session.encode(), "sha256")


class CurveKeys(NamedTuple):
    """ZeroMQ CURVE key pairs (Z85) of one start, derived from its session key: the front end's
    (the server's: it binds) and the ranks' (the client's). Only key holders can derive them,
    so a peer without the key completes no handshake with a socket of this start (it gets no
    message and can send none), and the traffic is encrypted (``curve_keys``)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


# What CURVE adds to each message on the wire, which libzmq counts against MAXMSGSIZE: the
# MESSAGE command's name (8 bytes), its nonce (8), the box's MAC (16) and the flags (1) are
# 33; a receiving socket over CURVE takes its cap plus this, so that a message at the cap
# still arrives (past MAXMSGSIZE the message is lost with its connection).
CURVE_BYTES = 64


def curve_keys(key: bytes, session: str) -> CurveKeys:
    """The CURVE key pairs of the start ``session`` under ``key``: each secret an HMAC of the
    session key (32 bytes, as Curve25519 wants; libzmq clamps it), each public key computed
    from its secret. The server's public key never crosses the wire (CurveZMQ's client encrypts
    its hello to it), so a peer that lacks the key fails the handshake before ZAP is asked."""
    import zmq
    from zmq.utils import z85

    skey = session_key(key, session)
    pairs = []
    for label in (b"afd-curve-server", b"afd-curve-client"):
        secret = z85.encode(hmac.digest(skey, label, "sha256"))
        pairs += [zmq.curve_public(secret), secret]
    return CurveKeys(*pairs)


def new_session() -> str:
    return secrets.token_hex(16)


class Sealer:
    """Seals what ``me`` sends and opens what it receives, under one session's key. Each
    message carries its sender's stream (random per Sealer) and a sequence number; a receiver
    keeps the last number taken from each stream and takes only larger ones (one ordered socket
    per sender and receiver: a legitimate sequence only grows), so a captured message sent
    again is refused. The table grows only by streams whose MAC held: key holders'."""

    def __init__(self, key: bytes, session: str, me: int):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the control key must be at least {MIN_KEY_BYTES} bytes, got "
                             f"{len(key)}")
        self._key, self.me, self._seq = session_key(key, session), me, 0
        self._stream = int.from_bytes(secrets.token_bytes(8), "big")
        self._last: dict[tuple[int, int], int] = {}

    def seal(self, to: int, data: bytes) -> bytes:
        self._seq += 1
        signed = _HEADER.pack(self.me, to, self._stream, self._seq) + data
        return hmac.digest(self._key, signed, "sha256") + signed

    def open(self, frame: bytes | memoryview) -> tuple[int, memoryview]:
        """(sender, body) of a sealed message to ``me``; Unsealed if its seal does not hold."""
        view = memoryview(frame)
        if len(view) < HEADER_BYTES:
            raise Unsealed(f"no seal ({len(view)} bytes, under the {HEADER_BYTES}-byte header)")
        signed = view[MAC_BYTES:]
        if not hmac.compare_digest(hmac.digest(self._key, signed, "sha256"), view[:MAC_BYTES]):
            raise Unsealed("its MAC does not match (no key, another key or altered bytes)")
        sender, receiver, stream, seq = _HEADER.unpack_from(view, MAC_BYTES)
        if receiver != self.me:
            raise Unsealed(f"sealed for {_who(receiver)}, not {_who(self.me)}")
        last = self._last.get((sender, stream), 0)
        if seq <= last:
            raise Unsealed(f"a replay: sequence {seq} from {_who(sender)}, not past the last "
                          f"taken ({last})")
        self._last[sender, stream] = seq
        return sender, view[HEADER_BYTES:]


def _who(party: int) -> str:
    return "the front end" if party == FRONT else f"rank {party}"


def seal_blob(key: bytes, purpose: bytes, data: bytes) -> bytes:
    """``data`` with a MAC under ``key`` (the rank spec as it travels through torchrun's
    store, which anyone who reaches its port can write)."""
    return hmac.digest(key, purpose + data, "sha256") + data


def open_blob(key: bytes, purpose: bytes, blob: bytes) -> bytes:
    data = blob[MAC_BYTES:]
    if len(blob) < MAC_BYTES or not hmac.compare_digest(
            hmac.digest(key, purpose + data, "sha256"), blob[:MAC_BYTES]):
        raise Unsealed("its MAC does not match")
    return data


def new_key() -> bytes:
    return secrets.token_bytes(32)


def key_from_env() -> bytes:
    """The key a parent handed this process (KEY_ENV, in hex), taken out of the environment so
    no process this one starts inherits it."""
    value = os.environ.pop(KEY_ENV, None)
    if value is None:
        raise RuntimeError(f"no control key: {KEY_ENV} is not set (the process that starts "
                           "this one sets it)")
    return bytes.fromhex(value)


def read_key_file(path: str, flag: str = "--control-key-file") -> bytes:
    """The operator's control key: the file's bytes, surrounding whitespace stripped (a hex
    line from ``openssl rand -hex 32`` works as well as raw bytes), at least MIN_KEY_BYTES.
    Refused, like ssh's private keys, unless this user owns it and no one else may read it."""
    try:  # O_NONBLOCK: a FIFO with no writer must not hold the start for good
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{flag} {path}: not a regular file ({stat.filemode(st.st_mode)})")
    with os.fdopen(fd, "rb") as f:
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(f"{flag} {path}: the control key file must belong to this user "
                             f"(uid {os.getuid()}) and be readable by no one else: "
                             f"chmod 600 {path} (it has owner {st.st_uid}, mode "
                             f"{stat.filemode(st.st_mode)})")
        key = f.read().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{flag} {path}: a control key needs at least {MIN_KEY_BYTES} bytes, "
                         f"the file holds {len(key)} (make one with: openssl rand -hex 32 > "
                         f"{path}; chmod 600 {path})")
    return key


def write_key_file(folder: str, key: bytes) -> str:
    """A new file holding ``key`` in ``folder`` (which should be this user's alone), created
    readable and writable by this user only. Returns its path."""
    path = os.path.join(folder, "control.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.hex().encode())
    return path


def split_out(msg: Out, cap: int) -> list[Out]:
    """``msg`` as several ``out`` messages, each under ``cap`` bytes encoded (its rows in
    order; its KV cache events with the first, read before any of the step's first tokens,
    as unsplit; the stats, timers and prefilled reports with the last): a step's outputs can
    hold many prompts' whole prompt logprobs. A single row is never larger than the cap
    (max_from_rank_bytes, which leaves room for a batch of events beside it)."""
    budget = cap - HEADER_BYTES - len(encode(Out([], msg.stats, msg.timers, msg.attn,
                                                 msg.prefilled, rank=msg.rank))) - 64
    kv = msg.kv
    parts, rows, size = [], [], 0 if kv is None else len(encode(kv))
    for row in msg.outs:
        n = len(encode(row))
        if rows and size + n > budget:
            parts.append(Out(rows, None, rank=msg.rank, kv=kv))
            rows, size, kv = [], 0, None
        rows.append(row)
        size += n
    parts.append(Out(rows, msg.stats, msg.timers, msg.attn, msg.prefilled, rank=msg.rank,
                     kv=kv))
    return parts
