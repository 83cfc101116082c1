"""Front-end side of a multi-rank layout: starts the rank processes and talks to them.

``MultiRankClient`` is the ``CoreClient`` of ``LLMEngine`` when the layout has more than one rank.
It is the global scheduler: it places each prompt on a prefill rank (or, with no prefill pool, an
attention rank), hands each finished prefill to a decode attention rank, relays the decode rank's
"ready to receive" to the prefill rank, forwards aborts to whoever holds a request, collects
tokens, and turns any rank's death, error or silence beyond the timeout into ``RankFailure``.
"""

from __future__ import annotations

import hmac
import itertools
import ipaddress
import logging
import math
import os
import signal
import socket
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import zmq

from afd import protocol
from afd.config import (EngineConfig, check_layout_options, check_prefill_expert_parallel,
                        check_window_layout)
from afd.core_stats import CoreStats, PrefixCacheStats
from afd.expert_load import NoExpertLoadRecord, sum_records
from afd.eplb import from_load, resolve_placement
from afd.placement import ExpertPlacement
from afd.rank_zygote import RankProcess, start_rank, start_way
from afd.rebalance import all_tables, check_same_slots, plan_from_record, redundant_slots
from afd.router import RequestRouter
from afd.sampling_params import ParamError
from afd.sequence import CoreOutput, CoreRequest
from afd.workers import (IDLE_POLL_S, DropLog, Layout, WorkerSpec, loopback_gloo_env, peer,
                         recv_sealed)
from models.config import ModelConfig

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch.distributed as dist

log = logging.getLogger("afd.layouts")

LOOPBACK = "127.0.0.1"


def loopback_store() -> dist.TCPStore:
    """A rendezvous store (TCPStore server) for ranks on this machine that listens on loopback
    only: given a host, TCPStore still binds its own server socket to every interface, so it
    is handed a socket already bound to 127.0.0.1."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    # the store owns the socket from here (it closes it)
    return dist.TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False,
                         master_listen_fd=sock.detach())


# what a rank's collective raises when a peer's connection breaks under it (gloo's TCP pairs,
# NCCL's transports): the peer died first
PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe",
             "remote process exited", "socket closed")


def peer_lost(msg: str) -> bool:
    """Whether a rank's error says a connection to a peer broke (the peer's death the cause)."""
    low = msg.lower()
    return any(m in low for m in PEER_LOST)


class RankFailure(RuntimeError):
    """A rank died, reported an error, or stopped answering."""


def is_loopback(host: str) -> bool:
    """A loopback address literal (127.x.x.x, ::1): every rank is on this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: across nodes
        return False


def zmq_host(host: str) -> str:
    """``host`` as a ZeroMQ ``tcp://`` address takes it: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def threads_per_rank(world_size: int) -> int:
    """CPU threads for each of ``world_size`` ranks on one machine, one share left to the
    front end."""
    return max(1, (os.cpu_count() or 1) // (world_size + 1))


@dataclass
class _Placed:
    """Where a request is: its stage and the ranks holding it."""

    request: CoreRequest
    stage: str  # "prefill", "transfer" or "decode"
    wire_id: str = ""  # what the ranks call it: unique to this placement (see add_request)
    prefill: int | None = None  # global rank
    decode: int | None = None  # global rank
    num_kv_tokens: int = 0
    first_token: int | None = None  # sampled by the prefill rank
    admitted: bool = False  # the decode rank has reserved blocks for the transfer


def secure_server(sock: zmq.Socket, keys: protocol.CurveKeys | None) -> None:
    """Make ``sock`` (not yet bound) a CURVE server with this start's front-end key pair
    (``keys``; None: plain TCP, as on one node). Which clients it admits is the ZAP handler's
    call (``start_authenticator``)."""
    if keys is not None:
        sock.curve_server = True
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public


class _RankKey:
    """ZAP's answer for CURVE: admit the ranks' public key only."""

    def __init__(self, client_public: bytes):
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.client_public)


def start_authenticator(ctx: zmq.Context, keys: protocol.CurveKeys):
    """A ZAP handler on ``ctx`` (a thread; stop it before the context ends) that admits only
    CURVE clients with the ranks' key pair: without one, libzmq admits any client that
    completes the handshake."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("afd.layouts.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_RankKey(keys.client_public))
    return auth


class MultiRankClient:
    prefill_ep = False  # prefill_expert_parallel: the prefill pool steps together (``_pool``)

    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, layout: Layout, *,
                 micro_batches: int = 2, transport: str = "torch", timeout_s: float = 60.0,
                 placement: ExpertPlacement | str | os.PathLike | None = None,
                 num_redundant_experts: int = 0, prefill_block_size: int | None = None,
                 eplb_interval_steps: int = 0,
                 startup_timeout_s: float = 300.0,
                 attach: Callable[[WorkerSpec], None] | None = None,
                 control_host: str = LOOPBACK, control_key: bytes | None = None,
                 while_waiting: Callable[[], None] | None = None):
        """Starts the P+A+F rank processes itself, or with ``attach`` leaves that to a launcher
        (torchrun): ``attach`` gets the spec every rank needs (rank -1) once the sockets are
        bound, and liveness then comes from the ranks' heartbeats instead of process handles.
        ``control_host``: the address the control sockets bind (loopback unless ranks run on
        other nodes). ``control_key``: the secret every control message is sealed with
        (afd.protocol); the ranks this starts get a new random one in their environment when
        none is given, and a launcher's ranks (``attach``) need it given to them and here.
        ``while_waiting``: called every 100 ms while the ranks start; what it raises fails the
        start as a rank's failure would (the front end's check of its tokenizer, which loads
        meanwhile)."""
        self._while_waiting = while_waiting
        if control_key is None:
            if attach is not None:
                raise ValueError("control_key: ranks started by a launcher (attach) must be "
                                 "handed the control key by it; pass the same key here")
            control_key = protocol.new_key()
        if attach is None:
            start_way()  # AFD_RANK_START checked before anything starts
        if layout.ffn and not model_cfg.num_experts:
            raise ValueError("ffn > 0 needs a MoE model; this checkpoint has no routed experts")
        check_layout_options(micro_batches=micro_batches, transport=transport,
                             timeout_s=timeout_s, prefill_block_size=prefill_block_size,
                             eplb_interval_steps=eplb_interval_steps)
        check_prefill_expert_parallel(engine_cfg.prefill_expert_parallel, layout.prefill,
                                      model_cfg.num_experts)
        check_window_layout(engine_cfg, model_cfg, layout.prefill)
        if transport == "deepep" and layout.ffn:
            from afd.deepep import DEFAULT_MAX_DISPATCH_TOKENS as most
            from afd.deepep import LL_HIDDEN_SIZES

            # A step's tokens on an attention rank, unsplit (one prefill chunk is one micro-batch),
            # must fit DeepEP's fixed receive slabs; found mid-step, it would fail the engine.
            if engine_cfg.max_num_batched_tokens > most:
                raise ValueError(
                    f"transport='deepep' moves at most {most} tokens per rank and micro-batch "
                    f"(DeepEP's low-latency receive slabs), but a step may hold "
                    f"max_num_batched_tokens={engine_cfg.max_num_batched_tokens}: set "
                    f"max_num_batched_tokens <= {most}")
            # found on the FFN ranks, it fails them once every rank has loaded its weights
            if model_cfg.hidden_size not in LL_HIDDEN_SIZES:
                raise ValueError(
                    f"transport='deepep': DeepEP's low-latency kernels are compiled for hidden "
                    f"sizes {LL_HIDDEN_SIZES}, the model's hidden_size is "
                    f"{model_cfg.hidden_size} (gpt-oss: 2880); use transport='torch'")
        self.layout, self.timeout_s = layout, timeout_s
        self.prefill_ep = engine_cfg.prefill_expert_parallel  # the prefill pool steps together
        self.model_shape = (model_cfg.num_layers, model_cfg.num_experts)  # expert load records
        self.mtp = engine_cfg.mtp  # the ranks hold the MTP layer (its experts are placed too)
        self.expert_loads: dict[int, list | None] = {}  # attention rank -> its last snapshot
        self.held: list[CoreOutput] = []  # outputs that arrived while waiting for the ranks
        if layout.ffn:  # a placement, a file (placement or load record: afd.eplb), or default
            placement = resolve_placement(placement, model_cfg.num_experts, model_cfg.num_layers,
                                          layout.ffn, num_redundant_experts)
            if placement.num_ranks != layout.ffn:
                raise ValueError(f"placement has {placement.num_ranks} ranks, layout has "
                                 f"ffn={layout.ffn}")
            if placement.num_experts != model_cfg.num_experts:
                raise ValueError(f"placement places {placement.num_experts} experts, the model "
                                 f"has {model_cfg.num_experts}")
            if placement.num_layers not in (None, model_cfg.num_layers):
                raise ValueError(f"placement has tables for {placement.num_layers} decoder "
                                 f"layers, the model has {model_cfg.num_layers}")
            if eplb_interval_steps:  # refused now rather than at every interval
                layers = model_cfg.num_layers
                even = from_load([[1] * model_cfg.num_experts] * layers, layout.ffn,
                                 redundant_slots(placement, layers))
                try:  # the slots every placement from a record has (the MTP layer's too)
                    check_same_slots(placement, even, layers, mtp=engine_cfg.mtp)
                except ValueError as exc:
                    raise ValueError(f"eplb_interval_steps: no rebalance from a record could "
                                     f"run from this start placement: {exc}") from None
        elif eplb_interval_steps:
            raise ValueError("eplb_interval_steps needs ffn >= 1")
        self.placement = placement
        self.eplb_interval = eplb_interval_steps
        self.eplb_at_step = 0  # the attention ranks' step count at the last periodic rebalance
        self.eplb_base: list[list[int]] | None = None  # the record's counts then
        self.error: str | None = None
        self.closed = False
        self.placed: dict[str, _Placed] = {}
        self.by_wire: dict[str, _Placed] = {}  # the same placements, by their wire ids
        self.placements = itertools.count()
        self.to_drop: set[str] = set()  # fault injection (tests)
        self.tags = itertools.count(1)
        self.pending_metrics: dict[str, dict] = {}
        attn_ranks = list(range(layout.prefill, layout.prefill + layout.attention))
        # every rank's KV pool as it reports it when ready (``_wait_ready``): with no size
        # given on a GPU, each sizes its own from its memory, and none is known here till then
        num_blocks = engine_cfg.num_kv_blocks or 0
        self.router = RequestRouter(
            list(range(layout.prefill)), attn_ranks, num_blocks,
            engine_cfg.block_size, prefill_block_size=prefill_block_size,
            host_blocks=engine_cfg.num_offload_blocks,
            cache_aware=engine_cfg.cache_aware_routing and engine_cfg.enable_prefix_caching,
            max_num_seqs=engine_cfg.max_num_seqs)
        self.rank_stats = {r: CoreStats(0, 0, 0.0, num_blocks, 0)
                           for r in attn_ranks}
        self.prefill_stats: dict[int, CoreStats] = {}
        self.rank_timers: dict[int, dict] = {}  # per rank: stage seconds, steps, votes
        self.rank_info: dict[int, dict] = {}  # what each rank says it holds

        self.control_key, self.session = control_key, protocol.new_session()
        self.sealer = protocol.Sealer(control_key, self.session, protocol.FRONT)
        self.drops = DropLog()  # the log of messages dropped for their seal (rate-limited)
        self.procs: list[subprocess.Popen | RankProcess] = []
        self.outboxes: dict[int, zmq.Socket] = {}
        self.ipc_dir: str | None = None  # one node's control sockets' folder
        self.auth = None
        self.ctx = zmq.Context()
        try:
            self._start(engine_cfg, layout, control_host, placement, micro_batches, transport,
                        timeout_s, prefill_block_size, attach, startup_timeout_s)
        except BaseException:
            # whatever failed (a bind, a launcher's attach, a rank): the ranks started stop,
            # and the sockets, their folder and the authenticator go with them, not left to
            # the garbage collector (which would wait out ranks that never said goodbye)
            self.error = self.error or "startup failed"
            self.shutdown()
            raise
        if self.eplb_interval:
            self.start_expert_load_record()

    def _start(self, engine_cfg: EngineConfig, layout: Layout, control_host: str,
               placement: ExpertPlacement | None, micro_batches: int, transport: str,
               timeout_s: float, prefill_block_size: int | None,
               attach: Callable[[WorkerSpec], None] | None, startup_timeout_s: float) -> None:
        """Bind the control sockets, start the ranks (or hand ``attach`` their spec), wait for
        every one to be ready."""
        host = zmq_host(control_host)
        if host.startswith("["):  # ZeroMQ sockets are IPv4-only unless told otherwise
            self.ctx.setsockopt(zmq.IPV6, 1)
        # across nodes, where the sockets listen on every interface: CURVE, so that a peer
        # without the key can neither take messages meant for a rank nor send any
        self.curve = None if is_loopback(control_host) else protocol.curve_keys(
            self.control_key, self.session)
        self.auth = None if self.curve is None else start_authenticator(self.ctx, self.curve)
        self.inbox = self.ctx.socket(zmq.PULL)
        secure_server(self.inbox, self.curve)
        # larger is no rank's message (a rank splits a larger ``out``): ZeroMQ drops the
        # connection on reading its size, before buffering any of it
        self.inbox.setsockopt(zmq.MAXMSGSIZE,
                              protocol.max_from_rank_bytes(engine_cfg.max_model_len) + (
                                  protocol.CURVE_BYTES if self.curve is not None else 0))
        # one node: Unix-domain sockets in a directory only this user may enter (mkdtemp's
        # 0700), so no other local user can connect to a rank's socket and take its messages,
        # as anyone could over loopback TCP. Across nodes: TCP on every interface (CURVE),
        # each rank told the address it can reach.
        self.ipc_dir = (tempfile.mkdtemp(prefix="afd-ctl-") if is_loopback(control_host)
                        else None)
        if self.ipc_dir is not None:  # the longest socket path must fit a sockaddr_un
            longest = os.path.join(self.ipc_dir, f"r{layout.world_size - 1}")
            most = getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107
            if len(os.fsencode(longest)) > most:
                raise ValueError(
                    f"the control sockets' Unix-domain path {longest!r} is "
                    f"{len(os.fsencode(longest))} bytes, over the {most} a Unix socket "
                    f"allows: set TMPDIR to a shorter folder (it is {tempfile.gettempdir()!r})")

        def bind(sock: zmq.Socket, name: str) -> str:
            if self.ipc_dir is not None:
                addr = f"ipc://{self.ipc_dir}/{name}"
                sock.bind(addr)
                return addr
            return f"tcp://{host}:{sock.bind_to_random_port('tcp://*')}"

        front_out = bind(self.inbox, "in")
        self.sent_at: dict[int, float] = {}  # when each rank was last sent a message
        front_in = []
        for rank in range(layout.world_size):
            if layout.role_of(rank)[0] == "ffn":
                front_in.append("")
                continue
            sock = self.ctx.socket(zmq.PUSH)
            secure_server(sock, self.curve)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
            self.outboxes[rank] = sock
            front_in.append(bind(sock, f"r{rank}"))
        self.last_seen = {r: time.monotonic() for r in range(layout.world_size)}
        template = WorkerSpec(rank=-1, layout=layout, engine_cfg=engine_cfg, placement=placement,
                              micro_batches=micro_batches, transport=transport,
                              timeout_s=timeout_s, store_host=LOOPBACK, store_port=0,
                              front_out=front_out,
                              front_in=tuple(front_in),
                              threads=threads_per_rank(layout.world_size),
                              prefill_block_size=prefill_block_size, session=self.session,
                              curve=self.curve is not None)
        if attach is not None:
            attach(template)
        else:
            self.store = loopback_store()
            # Forked from the rank zygote, or fresh interpreters (afd.rank_zygote): no
            # multiprocessing, so user scripts need no __main__ guard. Every rank is on this
            # machine; the key in the environment, which only this user can read
            # (/proc/PID/environ), not on the command line, which everyone can
            env = {**os.environ, **loopback_gloo_env(), protocol.KEY_ENV: self.control_key.hex()}
            for r in range(layout.world_size):  # (each kept at once: a failed start stops it)
                self.procs.append(start_rank(
                    replace(template, rank=r, store_port=self.store.port).to_json(), env))
        self._wait_ready(startup_timeout_s)
        self.last_heard = time.monotonic()

    # ---- liveness -------------------------------------------------------------------------
    def _describe(self, rank: int) -> str:
        role, index = self.layout.role_of(rank)
        return f"rank {rank} ({role} {index})"

    def _fail(self, message: str) -> None:
        self.error = message
        self.shutdown()
        raise RankFailure(message)

    def check_alive(self) -> None:
        """Raise RankFailure if any rank has died or the engine already failed; RuntimeError
        once shut down (its sockets are closed: a request added then was placed, never sent,
        and the next step failed on a closed socket with a bare ZMQError)."""
        if self.error:
            raise RankFailure(self.error)
        if self.closed and self.inbox.closed:  # shut down: its sockets are gone too
            raise RuntimeError("the engine was shut down: its rank processes are gone; start a "
                               "new one")
        exited = [rank for rank, p in enumerate(self.procs) if p.poll() is not None]
        if not exited:
            return
        # A rank a signal ended is the cause: a rank beside it whose collective broke (a
        # peer's connection reset) reports that and exits with code 1, and its exit can be
        # known first, or both at once (the ranks were looked at in order: CI named the reset
        # of prefill rank 0 beside a SIGKILLed rank 1)
        killed = [rank for rank in exited if self.procs[rank].returncode < 0]
        rank = killed[0] if killed else exited[0]
        self._drain_errors(rank)
        if not killed:  # exited saying nothing: perhaps on a peer lost, as a report would say
            cause = self._cause(rank)
            if cause is not None:
                self._fail(f"{cause}; then {self._exited(rank)}")
        self._fail(self._exited(rank))

    def _exited(self, rank: int) -> str:
        code = self.procs[rank].returncode
        try:
            how = f" ({signal.Signals(-code).name})" if code < 0 else ""
        except ValueError:
            how = ""
        return f"{self._describe(rank)} exited with code {code}{how}"

    def _killed(self, besides: int, wait_s: float = 0.25) -> int | None:
        """A rank other than ``besides`` whose process a signal ended (SIGKILL, a crash):
        the errors the others report then are its consequence (a peer's connection reset), so
        a failure names it first. A rank that fails on its own raises and exits with code 1,
        never by a signal. Waits up to ``wait_s`` for one: the others may notice the death
        before its process is reaped."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs):
                if rank != besides and p.poll() is not None and p.returncode < 0:
                    return rank
            if not self.procs or time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _rank_error(self, rank: int, msg: str) -> None:
        """Fail on a rank's error report; a rank killed meanwhile is named as the cause. A
        report that a peer's connection broke is a consequence, not a cause: a killed rank's
        sockets close the instant it dies, but its exit reaches this process only once its
        parent (the zygote) has reaped it and said so, which a loaded machine delays past
        0.25 s (CI named the gloo reset of a rank beside a SIGKILLed one). Such a report waits
        up to half the timeout for its cause (``_cause``: a rank killed, or another's report
        of an error of its own); any other error a quarter second for a rank killed."""
        if peer_lost(msg):
            cause = self._cause(rank)
        else:
            killed = self._killed(rank)
            cause = None if killed is None else self._exited(killed)
        if cause is not None:
            self._fail(f"{cause}; then {self._describe(rank)} failed: {msg}")
        self._fail(f"{self._describe(rank)} failed: {msg}")

    def _cause(self, besides: int) -> str | None:
        """What took rank ``besides``'s peer away, waiting up to half the timeout (5 s at most) for
        it: a rank a signal ended, or a rank's report of an error of its own (not a peer lost too),
        read from the inbox meanwhile. A rank that failed on its own says so and exits, and only
        then do its peers' connections to it break, but the reports travel on sockets of their own,
        read in no set order: the peer's came first, and its wait (for a rank killed, which none
        was) named it after half the timeout. Ranks launched elsewhere (no process handles: no kill
        to wait for) wait a second at most, for a report: it was sent before the peers' connections
        broke."""
        wait_s = min(self.timeout_s / 2, 5.0)
        deadline = time.monotonic() + (wait_s if self.procs else min(wait_s, 1.0))
        while True:
            killed = self._killed(besides, 0.0)
            if killed is not None:
                return self._exited(killed)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.inbox is None:
                time.sleep(min(left, 0.02))
            elif self.inbox.poll(max(1, int(min(left, 0.02) * 1000))):
                msg = self._recv()
                if isinstance(msg, protocol.Error) and msg.rank != besides \
                        and not peer_lost(msg.msg):
                    return f"{self._describe(msg.rank)} failed: {msg.msg}"

    def _check_heartbeats(self) -> None:
        """Every rank says something at least every second (a heartbeat when it has nothing
        else); one silent for ``timeout_s`` is wedged or gone, even if its process still exists.
        Called once the inbox is drained, so a front end that read nothing for a while (an
        offline LLM between calls) does not take its own idleness for the ranks'."""
        now = time.monotonic()
        if not any(now - seen > self.timeout_s for seen in self.last_seen.values()):
            return
        # Ranks blocked in a collective with a wedged one fall silent with it (an FFN rank
        # waits on its attention ranks in the vote, and reports less often): the first past
        # the timeout need not be the wedged one, so every rank silent for over half of it
        # is named (a wedged attention rank was reported as its FFN rank alone)
        silent = sorted(((now - seen, rank) for rank, seen in self.last_seen.items()
                         if now - seen > self.timeout_s / 2), reverse=True)
        names = [f"{self._describe(rank)} for {s:.1f}s" for s, rank in silent]
        if len(names) == 1:
            self._fail(f"{self._describe(silent[0][1])} silent for {silent[0][0]:.0f}s")
        self._fail(f"ranks silent: {', '.join(names)} (one is wedged or gone; a rank "
                   f"waiting on it in a collective falls silent with it)")

    def _recv(self, flags: int = 0) -> protocol.FromRank | None:
        """The next control message, or None for one that is not a well-formed message of a
        rank (bytes that are no control message, a field missing or of the wrong type, or a
        rank number outside the layout): logged with its sender and dropped, never the
        engine's death. A message whose seal does not hold (no MAC or a wrong one, a replay:
        afd.protocol) is dropped so before any of it is decoded, and so is one sealed by a
        rank that is not the rank it names. Of a malformed ``out`` (a step's outputs), the
        well-formed rows still count, and each request a bad row names fails alone
        (``_malformed``)."""
        got = recv_sealed(self.inbox, self.sealer, flags, "the front end", self.drops)
        if got is None:
            return None
        sender, body, frame = got
        try:
            msg = protocol.decode_from_rank(body)
        except protocol.ProtocolError as exc:
            if exc.rank is not None and exc.rank != sender:
                exc.rank = None  # only the sealed sender's claims count
            return self._malformed(exc, frame)
        if not 0 <= msg.rank < self.layout.world_size or msg.rank != sender:
            log.warning("dropped a %r control message from %s: it names rank %d, sealed by %s, "
                        "and the layout has ranks 0-%d", type(msg).__name__, peer(frame),
                        msg.rank, protocol._who(sender), self.layout.world_size - 1)
            return None
        return msg

    def _malformed(self, exc: protocol.ProtocolError, frame: zmq.Frame) -> protocol.Out | None:
        """Log a malformed message with its sender; of an ``out`` from a rank of the layout,
        keep the well-formed parts (``protocol.salvage_out``) and fail each request a bad part
        names: an error output in its place, and an abort to the ranks that hold it."""
        rank = exc.rank if exc.rank is not None and 0 <= exc.rank < self.layout.world_size \
            else None
        sender = peer(frame)
        if rank is not None:
            sender = f"{self._describe(rank)} at {sender}"
        salvage = rank is not None and exc.kind == "out"
        log.warning("dropped %s control message from %s (%d bytes): %s",
                    "the malformed parts of a" if salvage else "a", sender,
                    len(frame.buffer) - protocol.HEADER_BYTES,
                    exc)
        if not salvage:
            return None
        msg, bad = protocol.salvage_out(exc.raw)
        if exc.raw.get("kv") is not None and msg.kv is None:  # its KV cache events lost
            self.router.lost_kv_events(rank)
        for wire_id, why in bad:
            placed = None if wire_id is None else self._find(wire_id)
            if placed is not None:
                self._abort_on_ranks(placed)
                msg.outs.append(CoreOutput(wire_id, [], "error", None,
                                           f"{self._describe(rank)} sent {why}"))
        return msg

    def _drain_errors(self, dead: int) -> None:
        """A dying rank usually says why first; prefer its message to a bare exit code. Other
        ranks' errors meanwhile are only its consequence (their connections to it broke): a
        killed attention rank was reported as its FFN rank's gloo error. A rank that exited
        with a code sent its report before it exited, but the report is read off its socket
        by another thread than the one the exit reaches: it is waited for up to a second (an
        empty 50 ms poll ended the wait, too soon for a loaded machine, and the failure named
        a bare exit code); one a signal ended says nothing more: what arrived already is
        read."""
        code = self.procs[dead].returncode
        deadline = time.monotonic() + (1.0 if code is not None and code >= 0 else 0.0)
        while True:
            left = deadline - time.monotonic()
            if not self.inbox.poll(max(0, int(left * 1000))):
                if left <= 0:
                    return
                continue
            msg = self._recv()
            if isinstance(msg, protocol.Error) and msg.rank == dead:
                self._rank_error(dead, msg.msg)  # a peer's reset: a rank killed under it named

    ready = False
    inbox: zmq.Socket | None = None  # (set at the start)
    store: dist.TCPStore | None = None  # the ranks' rendezvous (none when a launcher starts them)

    def _wait_ready(self, timeout_s: float) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.layout.world_size:
            if time.monotonic() > deadline:
                self._fail(f"ranks {sorted(set(range(self.layout.world_size)) - ready)} not "
                           f"ready after {timeout_s:.0f}s")
            if not self.inbox.poll(100):
                self.check_alive()
                if self._while_waiting is not None:
                    try:
                        self._while_waiting()
                    except Exception as exc:  # noqa: BLE001 - named in the failure
                        self._fail(f"while the ranks started: {type(exc).__name__}: {exc}")
                continue
            msg = self._recv()
            if msg is None:
                continue
            if isinstance(msg, protocol.Ready):
                self._ready(msg.rank, msg.info)
                ready.add(msg.rank)
            else:
                self._handle(msg)
        self.ready = True
        self.last_seen = {r: time.monotonic() for r in range(self.layout.world_size)}

    def _ready(self, rank: int, info: protocol.RankInfo) -> None:
        """A rank is up: what it holds, and its KV pool (the router's capacity for it)."""
        self.rank_info[rank] = info
        role = self.layout.role_of(rank)[0]
        if role == "ffn":
            return
        blocks = info["num_kv_blocks"]
        log.info("%s: %d KV blocks of %d tokens", self._describe(rank), blocks,
                 self.router.prompt_block_size if role == "prefill" else self.router.block_size)
        self.router.set_kv_blocks(rank, blocks)
        if rank in self.rank_stats:
            self.rank_stats[rank] = CoreStats(0, 0, 0.0, blocks, 0)

    def _tell(self, rank: int, msg: protocol.ToRank) -> None:
        """Send ``msg`` to ``rank``; to a rank that steps with others (``_pool``), wake the
        others with it (an abort that ends a sleep there must not wait in the vote for the
        sleepers)."""
        if not self.closed:
            self._send(rank, protocol.encode(msg))
            if self._pool(rank):
                self._wake_others(rank)

    def _send(self, rank: int, data: bytes) -> None:
        """A rank that died takes its end of the socket with it, and a send with no peer would
        wait forever: check first, and give up after timeout_s (a live rank's socket takes a
        message at once unless some 2,000 are queued for it)."""
        self.check_alive()
        try:
            self.outboxes[rank].send(self.sealer.seal(rank, data))
            self.sent_at[rank] = time.monotonic()
        except zmq.Again:
            self.check_alive()
            self._fail(f"{self._describe(rank)} took no message for {self.timeout_s:.0f}s")

    _WAKE = protocol.encode(protocol.Wake())

    def _wake_others(self, rank: int) -> None:
        """A message (work, an abort, anything) just went to attention rank ``rank``, ending
        any sleep there: with FFN ranks, every other attention rank may be asleep on its
        socket (an idle cluster's, ``AttentionWorker.run``) and the vote that rank goes on to
        would wait for it; wake them (so for a prefill rank with prefill_expert_parallel: the
        rest of the prefill pool, ``PrefillWorker``). A rank whose queue is full is awake (it has
        not read them yet): the wake is dropped, never waited on. So is one to a rank sent
        anything in the last IDLE_POLL_S (a burst of adds would otherwise queue a wake per add
        on every rank): that message is unread, and ends any sleep at once, or was read under
        IDLE_POLL_S ago, and a rank sleeps only after QUIET_VOTES votes with no message since,
        each after a poll of IDLE_POLL_S."""
        if self.closed:
            return
        now = time.monotonic()
        for other in self._pool(rank):
            if other != rank and now - self.sent_at.get(other, -math.inf) >= IDLE_POLL_S:
                try:
                    self.outboxes[other].send(self.sealer.seal(other, self._WAKE),
                                              zmq.NOBLOCK)
                    self.sent_at[other] = now
                except zmq.Again:
                    pass

    def _pool(self, rank: int) -> range:
        """The ranks that step together with ``rank`` (and may sleep between votes): the
        attention ranks with FFN ranks, the prefill pool with prefill_expert_parallel; else
        none (a rank that steps alone wakes on its own message)."""
        layout = self.layout
        if rank < layout.prefill:
            return range(layout.prefill) if self.prefill_ep else range(0)
        if rank < layout.prefill + layout.attention and layout.ffn:
            return range(layout.prefill, layout.prefill + layout.attention)
        return range(0)

    # ---- CoreClient -----------------------------------------------------------------------
    def add_request(self, req: CoreRequest) -> None:
        self.check_alive()
        # The ranks know each placement by an id of its own: a request id can be reused as soon
        # as its request is aborted, while messages about the old one are still on their way.
        wire_id = f"{req.request_id}@{next(self.placements)}"
        # Packed first: a value msgpack cannot carry fails here, before anything is placed.
        wire = protocol.encode(protocol.Add(protocol.WireRequest.of(
            replace(req, request_id=wire_id))))
        if len(wire) > protocol.MAX_ADD_BYTES:  # the ranks' sockets take nothing larger
            raise ParamError("prompt", f"request {req.request_id!r} is {len(wire)} bytes as a "
                             f"control message (its prompt and sampling params); the limit is "
                             f"{protocol.MAX_ADD_BYTES}")
        if self.layout.prefill:
            rank = self.router.pick_prefill(req.prompt_token_ids, req.cache_salt, wire_id)
            self.router.prefill[rank].in_flight += 1
            placed = _Placed(req, "prefill", wire_id, prefill=rank)
        else:
            rank = self.router.pick_attention(req.prompt_token_ids, req.cache_salt, wire_id)
            self.router.attention[rank].in_flight += 1
            placed = _Placed(req, "decode", wire_id, decode=rank)
        self.placed[req.request_id] = placed
        self.by_wire[wire_id] = placed
        if not self.closed:
            self._send(rank, wire)
            self._wake_others(rank)
            if req.request_id in self.to_drop:
                self.to_drop.discard(req.request_id)
                self._tell(rank, protocol.Drop(wire_id))

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            placed = self._forget(rid)
            if placed is not None:
                self._abort_on_ranks(placed)

    def _abort_on_ranks(self, placed: _Placed) -> None:
        for rank in (placed.prefill, placed.decode):
            if rank is not None:
                self._tell(rank, protocol.Abort([placed.wire_id]))

    def _find(self, wire_id: str) -> _Placed | None:
        """The placement a rank's message is about; None once it is finished or aborted."""
        return self.by_wire.get(wire_id)

    def _forget(self, rid: str) -> _Placed | None:
        self.pending_metrics.pop(rid, None)
        placed = self.placed.pop(rid, None)
        if placed is None:
            return None
        self.by_wire.pop(placed.wire_id, None)
        self.router.prefilled(placed.wire_id)
        if placed.stage == "prefill":
            self.router.prefill[placed.prefill].in_flight -= 1
        elif placed.stage == "transfer":
            if not placed.admitted:
                self.router.admitted(placed.decode, placed.num_kv_tokens)
            self.router.attention[placed.decode].in_flight -= 1
        else:
            self.router.attention[placed.decode].in_flight -= 1
        return placed

    def drop_transfer(self, request_id: str) -> None:
        """Fault injection (tests): the prefill rank will never send the KV of the request
        added next under this id."""
        self.to_drop.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.placed)

    def stats(self) -> list[CoreStats]:
        return list(self.rank_stats.values())

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Over the prefill ranks (they admit the prompts in P/D) and the attention ranks, as of
        each rank's last report."""
        return PrefixCacheStats.total([*self.prefill_stats.values(), *self.rank_stats.values()])

    def reset_prefix_cache(self) -> None:
        """Every prefill and attention rank forgets its cached blocks, before it takes any
        request added after this call (one socket per rank keeps the order); so does the
        router's view of what they hold (and it drops their events from before the reset)."""
        self.router.reset_prefix_cache()
        for rank in range(self.layout.prefill + self.layout.attention):
            self._tell(rank, protocol.ResetPrefixCache())

    # ---- expert load record (afd.expert_load) ---------------------------------------------
    def _tell_attention(self, msg: protocol.ToRank) -> None:
        """Every attention rank (the ranks that route); prefill ranks record nothing."""
        if not self.model_shape[1]:
            raise NoExpertLoadRecord("the model has no routed experts: no expert load to record")
        for rank in range(self.layout.prefill, self.layout.prefill + self.layout.attention):
            self._tell(rank, msg)

    def start_expert_load_record(self) -> None:
        self._tell_attention(protocol.ExpertLoadStart())

    def stop_expert_load_record(self) -> None:
        self._tell_attention(protocol.ExpertLoadStop())

    def expert_load_record(self) -> dict:
        """Ask every attention rank for its counts and sum them (tokens that arrive meanwhile
        are kept for the next ``step``)."""
        self.expert_loads.clear()
        self._tell_attention(protocol.ExpertLoadDump())
        self._step_until(lambda: len(self.expert_loads) == self.layout.attention,
                         lambda: f"{self.layout.attention - len(self.expert_loads)} attention "
                                 f"ranks sent no expert load record")
        return sum_records(list(self.expert_loads.values()), *self.model_shape)

    # ---- live rebalancing (afd.rebalance) -------------------------------------------------
    rebalances = 0  # the last rebalance epoch sent to the ranks
    rebalance_totals = (0, 0, 0.0)  # rebalances done, slots moved, seconds (/metrics)
    mtp = False  # the ranks hold the MTP layer
    eplb_interval = 0  # eplb_interval_steps (0: no periodic rebalancing)
    waiting = False  # in a call that steps while it waits for the ranks

    def rebalance_experts(self, record: dict | None = None,
                          placement: ExpertPlacement | None = None) -> dict:
        """Switch every rank to a new expert placement while serving: ``placement``, or the one
        afd.eplb computes from ``record`` (default: the load recorded so far), with the slots
        each FFN rank has now. Returns a report: {"epoch", "placement", "moved" (slots FFN ranks
        received), "seconds" (the slowest rank's switch), and, from a record,
        "imbalance_before"/"imbalance_after" (max/mean FFN rank load on it)}."""
        if not self.layout.ffn:
            raise ValueError("rebalance_experts needs FFN ranks (ffn >= 1): with ffn=0 every "
                             "expert is on every rank, there is nothing to place")
        num_layers = self.model_shape[0]
        report: dict = {}
        if placement is None:
            if record is None:
                record = self.expert_load_record()  # NoExpertLoadRecord before any start
            placement, before, after = plan_from_record(self.placement, record, num_layers)
            report.update(imbalance_before=before, imbalance_after=after)
        elif record is not None:
            raise ValueError("rebalance_experts takes a record or a placement, not both")
        elif not isinstance(placement, ExpertPlacement):
            raise ValueError(f"placement must be an ExpertPlacement, got "
                             f"{type(placement).__name__}")
        check_same_slots(self.placement, placement, num_layers, mtp=self.mtp)
        self.rebalances += 1
        epoch = self.rebalances
        self._tell_attention(protocol.Rebalance(epoch, **placement.to_dict()))
        expected = set(range(self.layout.prefill, self.layout.world_size))
        self.rebalanced = {}

        def switched() -> bool:
            refused = [m.error for m in self.rebalanced.values() if m.error]
            if refused:  # not the front end's check: a rank's placement is not ours
                raise ValueError(f"rebalance {epoch} refused by a rank: {refused[0]}")
            return set(self.rebalanced) == expected

        self._step_until(switched, lambda: f"ranks {sorted(expected - set(self.rebalanced))} "
                                           f"did not switch to rebalance {epoch}")
        self.placement = placement
        self.rank_experts = {rank - self.layout.prefill - self.layout.attention: m.experts
                             for rank, m in self.rebalanced.items() if m.experts}
        report.update(epoch=epoch, placement=placement.to_dict(),
                      moved=sum(m.moved for m in self.rebalanced.values()),
                      seconds=max(m.seconds for m in self.rebalanced.values()))
        done, moved, seconds = self.rebalance_totals
        self.rebalance_totals = (done + 1, moved + report["moved"], seconds + report["seconds"])
        log.info("rebalance %d: %d expert slots moved between FFN ranks, %.3fs%s", epoch,
                 report["moved"], report["seconds"],
                 f"; max/mean FFN rank load on the record {report['imbalance_before']:.3f} -> "
                 f"{report['imbalance_after']:.3f}" if "imbalance_after" in report else "")
        return report

    def _step_until(self, done: Callable[[], bool], missing: Callable[[], str]) -> None:
        """Take the ranks' messages until ``done()`` (outputs that arrive meanwhile are held for
        the next ``step``), failing the engine with ``missing()`` after ``timeout_s``; no
        periodic rebalance starts inside."""
        deadline = time.monotonic() + self.timeout_s
        waiting, self.waiting = self.waiting, True
        try:
            while not done():
                if time.monotonic() > deadline:
                    self._fail(f"{missing()} within {self.timeout_s:.0f}s")
                self.held = self.step(0.05)
        finally:
            self.waiting = waiting

    def _steps(self) -> int:
        """Decode steps run so far (every attention rank runs each one, with FFN ranks), as of
        the attention ranks' last reports."""
        return max((self.rank_timers.get(rank, {}).get("steps", 0) for rank in self.rank_stats),
                   default=0)

    def _periodic_rebalance(self) -> None:
        """``eplb_interval_steps``: rebalance from the load routed since the last interval (the
        difference of two dumps of the record this client started; the whole record if it
        was restarted meanwhile); nothing when no token was routed or the placement would not
        change. A failed plan is logged, never the engine's end."""
        self.eplb_at_step = self._steps()
        counts = self.expert_load_record()["counts"]
        base, self.eplb_base = self.eplb_base, counts
        window = counts
        if base is not None:
            diff = [[c - b for c, b in zip(row, old)] for row, old in zip(counts, base)]
            if all(d >= 0 for row in diff for d in row):
                window = diff
        if not any(any(row) for row in window):
            return
        num_layers = self.model_shape[0]
        try:
            placement, before, after = plan_from_record(self.placement, {"counts": window},
                                                        num_layers)
            if all_tables(placement, num_layers) == all_tables(self.placement, num_layers):
                return
            report = self.rebalance_experts(placement=placement)
        except ValueError as exc:  # a rank refused it (RankFailure is no ValueError)
            log.warning("periodic rebalance skipped: %s", exc)
            return
        log.info("periodic rebalance %d at step %d: max/mean FFN rank load over the last %d "
                 "steps %.3f -> %.3f", report["epoch"], self.eplb_at_step, self.eplb_interval,
                 before, after)

    rebalanced: dict[int, protocol.Rebalanced] = {}
    rank_experts: dict[int, dict[int, list[int]]] = {}  # FFN rank -> {layer: slots' experts}

    # ---- messages from the ranks ----------------------------------------------------------
    def _handle(self, msg: protocol.FromRank) -> list[CoreOutput]:
        rank = msg.rank
        self.last_seen[rank] = time.monotonic()
        if isinstance(msg, protocol.Out):
            return self._outputs(msg)
        if isinstance(msg, protocol.Error):
            self._rank_error(rank, msg.msg)
        elif isinstance(msg, protocol.Timers):
            self.rank_timers[rank] = msg.timers
        elif isinstance(msg, protocol.ExpertLoad):
            if rank in self.rank_stats:
                self.expert_loads[rank] = msg.counts
        elif isinstance(msg, protocol.Rebalanced):
            if msg.epoch == self.rebalances and self.layout.role_of(rank)[0] != "prefill":
                self.rebalanced[rank] = msg
        elif isinstance(msg, (protocol.Admitted, protocol.TransferFailed)):
            self._transfer_reply(msg)
        elif isinstance(msg, protocol.Transferred):
            placed = self._find(msg.id)
            if placed is not None and placed.decode == rank:
                placed.stage = "decode"
                self.pending_metrics[placed.request.request_id] = {
                    "transfer_time": msg.seconds}
        return []

    def _transfer_reply(self, msg: protocol.Admitted | protocol.TransferFailed) -> None:
        """A decode rank has posted the receive of a request's KV (admitted: tell the prefill
        rank to send), or given up on it (tell it to complete the receive with anything)."""
        if not (0 <= msg.src < self.layout.prefill and msg.rank in self.rank_stats):
            log.warning("dropped a %r control message from %s: prefill rank %d to attention "
                        "rank %d is no transfer of this layout", type(msg).__name__,
                        self._describe(msg.rank), msg.src, msg.rank)
            return
        if isinstance(msg, protocol.TransferFailed):
            self._tell(msg.src, protocol.Cancel(msg.id, msg.rank, msg.tag, msg.n))
            return
        placed = self._find(msg.id)
        if placed is not None and placed.decode == msg.rank:
            placed.admitted = True
            self.router.admitted(msg.rank, placed.num_kv_tokens)
        # even for a request aborted meanwhile: the posted receive must be answered
        self._tell(msg.src, protocol.Send(msg.id, msg.rank, msg.tag, msg.n))

    def _outputs(self, msg: protocol.Out) -> list[CoreOutput]:
        """A step's outputs: the rank's load, its tokens, and (from a prefill rank) the
        requests ready to move to a decode rank."""
        rank, stats = msg.rank, msg.stats
        if msg.timers is not None:
            self.rank_timers[rank] = msg.timers
        if stats is None:
            pass  # a malformed message's (salvage_out): the last report stands
        elif rank in self.rank_stats:
            self.rank_stats[rank] = stats
            self.router.report(rank, stats.num_free_blocks, stats.num_running,
                               stats.num_waiting_blocks, stats.num_window_blocks,
                               stats.num_free_window_blocks)
        else:
            self.prefill_stats[rank] = stats
        if msg.kv is not None:  # before the outputs: a first token confirms what was sent
            self.router.kv_events(rank, msg.kv.resets, msg.kv.removed, msg.kv.stored)
        output = self._output
        outs = [output(o) for o in msg.outs]
        for p in msg.prefilled:
            outs.append(self._hand_to_decode(p.id, p.num_kv_tokens, p.drafts))
        return [o for o in outs if o is not None]

    def _output(self, out: CoreOutput) -> CoreOutput | None:
        placed = self._find(out.request_id)
        if placed is None:
            return None  # aborted meanwhile
        prompt_logprobs = out.prompt_logprobs
        if prompt_logprobs is not None and \
                len(prompt_logprobs) < len(placed.request.prompt_token_ids) - 1:
            # a rank's message well formed but short of the prompt: the request fails alone
            out = CoreOutput(out.request_id, [], "error", None, f"prompt_logprobs: a rank sent "
                             f"{len(prompt_logprobs)} rows for a prompt of "
                             f"{len(placed.request.prompt_token_ids)} tokens")
            self._abort_on_ranks(placed)
        out.request_id = placed.request.request_id
        extra = self.pending_metrics.pop(out.request_id, None)
        if extra:
            out.metrics = {**(out.metrics or {}), **extra}
        if out.new_token_ids and placed.stage != "transfer":  # its prompt is computed
            self.router.prefilled(placed.wire_id)
        if out.finish_reason is not None:
            self._forget(out.request_id)
            if placed.stage == "transfer" and placed.prefill is not None:
                self._tell(placed.prefill, protocol.Release(placed.wire_id))
        elif placed.stage == "prefill" and out.new_token_ids:
            placed.first_token = out.new_token_ids[-1]
        return out

    def _hand_to_decode(self, wire_id: str, num_kv_tokens: int, drafts: list[int]
                        ) -> CoreOutput | None:
        """``drafts``: the prefill rank's MTP draft after the first token (none without MTP).
        Returns the request's error output if the report cannot be right."""
        placed = self._find(wire_id)
        if placed is None or placed.stage != "prefill":
            if placed is None:  # aborted while prefilling: the prefill rank frees it
                for rank in self.router.prefill:
                    self._tell(rank, protocol.Release(wire_id))
            return None
        prompt = len(placed.request.prompt_token_ids)
        if placed.first_token is None or not 0 < num_kv_tokens <= prompt:
            # a report no prefill rank makes (a decode rank would wait for its blocks for
            # ever): the request fails alone
            self._abort_on_ranks(placed)
            return self._output(CoreOutput(
                wire_id, [], "error", None, f"{self._describe(placed.prefill)} reported it "
                f"prefilled with {num_kv_tokens} KV tokens of a {prompt}-token prompt"
                f"{'' if placed.first_token is not None else ' and no first token'}"))
        self.router.prefill[placed.prefill].in_flight -= 1
        decode = self.router.pick_decode(num_kv_tokens)
        self.router.attention[decode].in_flight += 1
        placed.stage, placed.decode, placed.num_kv_tokens = "transfer", decode, num_kv_tokens
        self._tell(decode, protocol.Pull(
            protocol.WireRequest.of(replace(placed.request, request_id=placed.wire_id)),
            placed.first_token, drafts, num_kv_tokens, placed.prefill, next(self.tags)))
        return None  # (_tell woke the other attention ranks)

    def poll(self) -> None:
        """Take the ranks' reports while nothing is in flight (and notice dead ranks)."""
        self.step(0.0)

    def step(self, wait_s: float = 0.05) -> list[CoreOutput]:
        """Whatever tokens arrived, waiting up to ``wait_s`` for the first message."""
        self.check_alive()
        outputs, self.held = self.held, []
        if self.inbox.poll(int(wait_s * 1000)):
            while True:
                try:
                    msg = self._recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msg is not None:
                    outputs += self._handle(msg)
            self.last_heard = time.monotonic()
        elif self.placed and time.monotonic() - self.last_heard > self.timeout_s:
            self._fail(f"no answer from any rank for {self.timeout_s:.0f}s with "
                       f"{len(self.placed)} requests in flight")
        self._check_heartbeats()
        if (self.eplb_interval and not self.waiting and not self.closed
                and self._steps() - self.eplb_at_step >= self.eplb_interval):
            self.held = outputs
            self._periodic_rebalance()
            outputs, self.held = self.held, []
        return outputs

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rank, sock in self.outboxes.items():
            try:
                sock.send(self.sealer.seal(rank, protocol.encode(protocol.Shutdown())),
                          zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if not self.procs and self.error is None:  # launched elsewhere: wait for their goodbyes
            gone: set[int] = set()
            while len(gone) < self.layout.world_size and time.monotonic() < deadline:
                if self.inbox.poll(100):
                    msg = self._recv()
                    if isinstance(msg, protocol.Error):
                        # a rank failed: as after a failure before the stop, no wait for the
                        # others (a peer it took down, killed, says no goodbye: 10 s lost)
                        break
                    if isinstance(msg, protocol.Bye):
                        gone.add(msg.rank)
        # the rendezvous store's server: its port stays bound as long as this client lives
        # (an LLM kept after shutdown, a failed engine a server keeps for its error) otherwise
        self.store = None
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.ctx.destroy(linger=1000)
        if getattr(self, "ipc_dir", None) is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def start_multi_rank(engine_cfg: EngineConfig, model_cfg: ModelConfig, *, prefill: int,
                     attention: int, ffn: int, **options: Any) -> MultiRankClient:
    return MultiRankClient(engine_cfg, model_cfg, Layout(prefill, attention, ffn), **options)
