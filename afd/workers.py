"""Rank processes of a disaggregated layout: attention ranks and FFN ranks.

Every decode step is collective over the attention+FFN group. Each attention rank schedules its
own requests, then all ranks agree (one all_reduce) on go/stop and the micro-batch count; an
attention rank with nothing to run still takes part with zero tokens, and FFN ranks serve every
MoE layer of every micro-batch whether or not tokens come. A quiescent cluster votes only a few
times a second (``AttentionWorker.run``). Control (requests in, tokens out)
travels as msgpack over ZeroMQ to the front end; tensors only through torch.distributed, whose
every collective carries the layout's timeout, so a dead rank is an error, not a hang.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import zmq

from afd import protocol
from afd.config import EngineConfig, engine_config_from_dict, engine_config_to_dict
from afd.placement import ExpertPlacement
from models.config import ModelConfig

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch

    from afd.transport import ExpertGroups

log = logging.getLogger("afd.worker")



@dataclass(frozen=True)
class Layout:
    """Counts of each role. Global ranks: prefill [0, P), attention [P, P+A), FFN [P+A, P+A+F)."""

    prefill: int
    attention: int
    ffn: int

    @property
    def world_size(self) -> int:
        return self.prefill + self.attention + self.ffn

    def role_of(self, rank: int) -> tuple[str, int]:
        if rank < self.prefill:
            return "prefill", rank
        if rank < self.prefill + self.attention:
            return "attention", rank - self.prefill
        return "ffn", rank - self.prefill - self.attention

    @property
    def expert_ranks(self) -> list[int]:
        """The attention+FFN group, attention first."""
        return list(range(self.prefill, self.world_size))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start (passed at process creation, never over a socket)."""

    rank: int
    layout: Layout
    engine_cfg: EngineConfig
    placement: ExpertPlacement | None  # None without FFN ranks
    micro_batches: int
    transport: str
    timeout_s: float
    store_host: str
    store_port: int
    front_out: str  # every rank pushes its status and outputs here
    front_in: tuple[str, ...]  # rank r pulls its requests from front_in[r] ("" for FFN ranks)
    threads: int = 1
    prefill_block_size: int | None = None  # prefill ranks' KV block size (default: the same)
    local_rank: int | None = None  # which GPU on this node (default: rank)
    session: str = ""  # this start's id, bound into the control messages' key (afd.protocol)
    curve: bool = False  # control sockets over ZeroMQ CURVE (across nodes: secure_client)

    def to_json(self) -> str:
        d = asdict(self)
        d["engine_cfg"] = engine_config_to_dict(self.engine_cfg)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        d["layout"] = Layout(**d["layout"])
        d["engine_cfg"] = engine_config_from_dict(d["engine_cfg"])
        if d["placement"] is not None:
            d["placement"] = ExpertPlacement.from_dict(d["placement"])
        d["front_in"] = tuple(d["front_in"])
        return cls(**d)


class Groups:
    """Process groups every rank creates in the same order (torch.distributed requires it).

    With FFN ranks: ``step`` (the per-step vote) and one group per micro-batch, all over the
    attention+FFN ranks. Without, attention ranks step independently and need none. With
    ``prefill_expert_parallel`` (P >= 2): ``prefill_step`` (the prefill pool's vote) and
    ``prefill_experts`` (its MoE all-to-alls, afd.transport.PeerExperts), over the prefill
    ranks, made after the others. KV transfers from prefill ranks are point-to-point on the
    default group. Every group carries ``timeout``: a dead peer is an error, not a hang.
    """

    def __init__(self, layout: Layout, micro_batches: int, timeout: datetime.timedelta,
                 device: torch.device | None = None, prefill_expert_parallel: bool = False):
        import torch.distributed as dist

        from afd.transport import ExpertGroups

        self.step = None
        self.experts: ExpertGroups | None = None
        self.prefill_step = self.prefill_experts = None
        if layout.ffn:
            ranks = layout.expert_ranks
            self.step = dist.new_group(ranks, timeout=timeout)
            self.experts = ExpertGroups(layout.attention, layout.ffn,
                                        [dist.new_group(ranks, timeout=timeout)
                                         for _ in range(micro_batches)])
            if device is not None and layout.ffn > 1 and dist.get_rank() in ranks:
                start_device_backend(self.step, device)  # (one FFN rank moves nothing)
        if prefill_expert_parallel and layout.prefill > 1:
            ranks = list(range(layout.prefill))
            self.prefill_step = dist.new_group(ranks, timeout=timeout)
            self.prefill_experts = dist.new_group(ranks, timeout=timeout)


def start_device_backend(group, device: torch.device) -> None:
    """Where ``group`` moves CUDA tensors over NCCL (``backend_for``): one collective of every
    rank of it on a CUDA tensor, so that its NCCL communicator exists before the first batched
    point-to-point call. The step group carries only host tensors (over gloo) until a live
    rebalance's expert moves (afd.rebalance.move_experts), which are batched point-to-point
    between FFN ranks alone: torch leaves a first NCCL call of the group that not every rank
    joins undefined (the communicator's creation waits for all of them: a hang)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda" and "nccl" in str(dist.get_backend(group)):
        dist.all_reduce(torch.zeros(1, device=device), group=group)


def peer(frame: zmq.Frame) -> str:
    """Where a received message came from, as ZeroMQ knows it (TCP: the peer's address; a
    Unix-domain socket: ``localhost:UID:GID:PID`` of the peer process)."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError, TypeError):
        return "an unknown peer"


class DropLog:
    """The log of the control messages one socket drops for their seal: anyone who reaches the
    socket can send bad seals as fast as the network goes, and a line apiece would make the
    flood a disk and CPU one too. The first FULL drops of each WINDOW_S are logged in full,
    the rest counted, and the count logged in one line with the next drop after the window."""

    FULL = 10
    WINDOW_S = 60.0

    def __init__(self):
        self.since, self.logged, self.hidden = -float("inf"), 0, 0

    def warn(self, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self.since >= self.WINDOW_S:
            if self.hidden:
                log.warning("... and %d more control messages dropped so in the last %.0fs "
                            "(not logged one by one)", self.hidden, now - self.since)
            self.since, self.logged, self.hidden = now, 0, 0
        if self.logged < self.FULL:
            self.logged += 1
            log.warning(fmt, *args)
        else:
            self.hidden += 1


def recv_sealed(sock: zmq.Socket, sealer: protocol.Sealer, flags: int, who: str,
                drops: DropLog) -> tuple[int, memoryview, zmq.Frame] | None:
    """The next message on ``sock`` whose seal holds: (sender, body, frame). Anything else (a
    message of several frames, no MAC or a wrong one, for another receiver, a replay) is
    dropped, never decoded, and logged with its sender through ``drops`` (rate-limited):
    None. zmq.Again as ``recv``."""
    frame = sock.recv(flags, copy=False)
    if frame.more:  # every control message is one frame: drop the rest of this one
        parts = 1
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(copy=False)
            parts += 1
        drops.warn("%s dropped a control message of %d frames from %s: not sealed", who,
                   parts, peer(frame))
        return None
    try:
        sender, body = sealer.open(frame.buffer)
    except protocol.Unsealed as exc:
        drops.warn("%s dropped a control message from %s (%d bytes), not decoded: %s", who,
                   peer(frame), len(frame.buffer), exc)
        return None
    return sender, body, frame


def secure_client(sock: zmq.Socket, keys: protocol.CurveKeys | None) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the front end's sockets, with this
    start's rank key pair (``keys``; None: plain TCP, as on one node)."""
    if keys is not None:
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public
        sock.curve_serverkey = keys.server_public


class Outbox:
    """A rank's socket to the front end: each message sealed for the front end, and a step's
    ``out`` that would pass ``max_bytes`` (the front end's cap: afd.protocol) split by rows."""

    def __init__(self, sock: zmq.Socket, sealer: protocol.Sealer, rank: int, max_bytes: int):
        self.sock, self.sealer, self.rank, self.max_bytes = sock, sealer, rank, max_bytes

    def send(self, msg: protocol.FromRank, flags: int = 0) -> None:
        msg.rank = self.rank
        data = protocol.encode(msg)
        if len(data) + protocol.HEADER_BYTES > self.max_bytes:
            if isinstance(msg, protocol.Out):
                for part in protocol.split_out(msg, self.max_bytes):
                    self.sock.send(self.sealer.seal(protocol.FRONT, protocol.encode(part)),
                                   flags)
                return
            # Past the cap the front end drops this rank's connection for good (ZeroMQ does
            # not reconnect after that protocol error) and only sees the rank fall silent.
            # An error report is cut to fit (a character packs to at most 4 bytes); no other
            # kind comes near the cap: refused here, where the rank's own report says why.
            if not isinstance(msg, protocol.Error):
                kind = type(msg).__struct_config__.tag
                raise ValueError(f"a {kind!r} message of {len(data)} bytes would pass the "
                                 f"front end's cap {self.max_bytes}")
            room = (self.max_bytes - protocol.HEADER_BYTES - 1024) // 4
            msg.msg = msg.msg[:room] + f" ... (cut at {room} of {len(msg.msg)} characters)"
            data = protocol.encode(msg)
        self.sock.send(self.sealer.seal(protocol.FRONT, data), flags)


class ControlLink:
    """This rank's ZeroMQ sockets to the front end: an inbox of requests, an outbox of results."""

    def __init__(self, ctx: zmq.Context, out: Outbox, inbox_addr: str, rank: int,
                 curve: protocol.CurveKeys | None = None):
        self.out, self.rank, self.sealer = out, rank, out.sealer
        self.drops = DropLog()
        self.inbox = ctx.socket(zmq.PULL)
        secure_client(self.inbox, curve)
        # larger is no message of the front end's (it refuses such a request): ZeroMQ drops
        # the connection on reading its size, before buffering any of it
        self.inbox.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_TO_RANK_BYTES + (
            protocol.CURVE_BYTES if curve is not None else 0))
        self.inbox.connect(inbox_addr)

    def poll(self, timeout_s: float) -> list[protocol.ToRank | protocol.Refused]:
        """Every message waiting, after waiting up to ``timeout_s`` for the first. One whose
        seal does not hold is logged and dropped undecoded (``recv_sealed``); a malformed one
        is logged and dropped; one that names its request (``add``, ``pull``) becomes a
        ``Refused`` for it, which the rank answers with that request's error output."""
        msgs = []
        who = f"rank {self.rank}"
        if self.inbox.poll(int(timeout_s * 1000)):
            while True:
                try:
                    got = recv_sealed(self.inbox, self.sealer, zmq.NOBLOCK, who,
                                      self.drops)
                except zmq.Again:
                    break
                if got is None:
                    continue
                sender, data, _ = got
                if sender != protocol.FRONT:  # a rank's key, misused: no rank writes here
                    log.warning("rank %d dropped a control message sealed by rank %d", self.rank,
                                sender)
                    continue
                try:
                    msgs.append(protocol.decode_to_rank(data))
                except protocol.ProtocolError as exc:
                    log.warning("rank %d dropped a control message from the front end (%d "
                                "bytes): %s", self.rank, len(data), exc)
                    if exc.request_id is not None:
                        msgs.append(protocol.Refused(exc.request_id, str(exc)))
        return msgs

    def send(self, msg: protocol.FromRank) -> None:
        self.out.send(msg)
        self.last_sent = time.monotonic()

    last_sent = 0.0

    def heartbeat(self) -> None:
        """Tell the front end this rank is alive when it has said nothing for a second
        (``send_droppable``: a rank never blocks on one)."""
        if time.monotonic() - self.last_sent > HEARTBEAT_S:
            send_droppable(self.out, protocol.Heartbeat(rank=self.rank))
            self.last_sent = time.monotonic()


def send_droppable(out: Outbox, msg: protocol.FromRank) -> bool:
    """Send a message a later one supersedes (heartbeat, timers) without ever blocking: when the
    front end reads nothing for a long while its queue fills, and the message is dropped.
    Returns whether it went."""
    try:
        out.send(msg, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def local_config(cfg: EngineConfig, device: torch.device, **changes) -> EngineConfig:
    return EngineConfig(**{**cfg.__dict__, "device": str(device), **changes})


def core_config(spec: WorkerSpec, device: torch.device,
                model_cfg: ModelConfig | None = None) -> EngineConfig:
    """The config of a prefill or attention rank's EngineCore, once its weights are loaded: its
    own sampling seed; a prefill rank's KV pool and host tier at ``prefill_block_size`` holding
    as many tokens; no host tier on P/D decode ranks (they never cache the KV they receive: the
    tier is for prompt ranks), nor a hybrid model's state snapshots there (its prefix cache
    off: only a sequence preempted and recomputed there could have used them, and they take
    memory from the pool: 16 snapshots are 1.15 GiB at Qwen3-Next-80B's dims). With no KV size
    given on a GPU, the rank sizes its pool from its own memory (afd.kv_memory), which needs
    its model's ``model_cfg``."""
    from afd.kv_memory import kv_pools_from_memory
    from afd.sampler import rank_seed

    cfg = spec.engine_cfg
    prefill = spec.rank < spec.layout.prefill
    changes: dict = {"seed": rank_seed(cfg.seed, spec.rank)}
    if prefill:
        block = spec.prefill_block_size or cfg.block_size
        # (async scheduling: the decode ranks'; a prefill rank parks each sequence after its
        # first token, read at once)
        changes.update(block_size=block, async_scheduling=False,
                       num_offload_blocks=cfg.num_offload_blocks * cfg.block_size // block)
        if cfg.num_kv_blocks is not None:
            changes["num_kv_blocks"] = -(-cfg.num_kv_blocks * cfg.block_size // block)
    elif spec.layout.prefill:
        changes["num_offload_blocks"] = 0
        if cfg.num_state_snapshots:  # a hybrid model's: no snapshot slots, no prefix cache
            changes.update(num_state_snapshots=0, enable_prefix_caching=False)
    local = local_config(cfg, device, **changes)
    if local.num_kv_blocks is None:
        # graphs: only a decoding rank without FFN ranks captures them (model_runner)
        local = local_config(local, device, **kv_pools_from_memory(
            local, model_cfg, device, "prefill" if prefill else "attention",
            ranks_on_device=ranks_on_device(spec, device),
            graphs=not (prefill or local.enforce_eager or spec.layout.ffn)))
    return local


def ranks_on_device(spec: WorkerSpec, device: torch.device) -> int:
    """How many ranks of this node use ``device`` (``_device``: local rank modulo the GPU
    count): several ranks on one GPU (a one-GPU run of a layout) split its memory."""
    import torch

    if device.type != "cuda":
        return 1
    if spec.local_rank is None:  # the front end started every rank on this node
        local, node_ranks = spec.rank, spec.layout.world_size
    else:  # torchrun
        local = spec.local_rank
        node_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", spec.layout.world_size))
    gpus = torch.cuda.device_count()
    return len(range(local % gpus, node_ranks, gpus))


HEARTBEAT_S = 1.0
IDLE_SLEEP_S = 0.5  # how long a quiescent rank waits on its socket (at most: idle_sleep_s)


IDLE_POLL_S = 0.01  # how long an idle rank waits for messages between votes, work in flight
QUIET_VOTES = 3  # consecutive quiescent votes before the ranks sleep


def idle_sleep_s(timeout_s: float) -> float:
    """How long a rank with nothing to do and nothing in flight waits on its control socket
    (any message ends the wait at once): well inside the layout's timeout (gloo's on the step
    vote, the front end's silence check), so heartbeats still go out about every HEARTBEAT_S and
    a rank that waits in the vote for a sleeping one never times out. A rank's heartbeat goes
    out at its first loop past HEARTBEAT_S of silence, up to HEARTBEAT_S plus this wait after
    its last message: below 2 s of timeout the wait shrinks to keep that under ``timeout_s``
    (down to IDLE_POLL_S, which a timeout near HEARTBEAT_S needs anyway)."""
    return min(IDLE_SLEEP_S, timeout_s / 8, max(IDLE_POLL_S, (timeout_s - HEARTBEAT_S) / 4))


def loopback_gloo_env() -> dict[str, str]:
    """For ranks that all run on this machine: gloo listens on the address the host name
    resolves to (a LAN address on many machines) unless told an interface, so name the
    loopback one (``GLOO_SOCKET_IFNAME``) and its sockets stay on 127.0.0.1. Empty where the
    user set one, or no loopback interface is found by its usual name."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    return {} if loopback is None else {"GLOO_SOCKET_IFNAME": loopback}


def _device(cfg: EngineConfig, local_rank: int) -> torch.device:
    import torch

    if cfg.device.startswith("cuda"):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """When each rank has its own GPU: NCCL for CUDA tensors (dispatch/combine, KV transfers,
    expert moves) and gloo for CPU tensors, one process group serving both by the tensor's
    device (torch's "cpu:gloo,cuda:nccl"): the step vote and a rebalance's tables are small
    host tensors, which NCCL refuses. Plain NCCL failed the first vote of any layout with FFN
    ranks. gloo alone on CPU, and where ranks share one GPU (NCCL refuses that)."""
    import torch

    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def join_process_group(device: torch.device, **kwargs) -> None:
    """``dist.init_process_group`` with ``backend_for(device)``; where that takes NCCL, this
    process's current CUDA device is set to ``device`` first (NCCL's batched point-to-point
    and barriers run on the current device: cuda:0 on every rank otherwise)."""
    import torch
    import torch.distributed as dist

    backend = backend_for(device)
    if "nccl" in backend:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **kwargs)


def watch_parent() -> None:
    """Exit if the front end dies, so no rank outlives the process that started it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="afd-parent-watch").start()


def check_front_here(spec: WorkerSpec) -> None:
    """One node's control sockets are Unix-domain sockets (``ipc://``) in a folder of the
    front end's machine (afd.layouts, a loopback control host); a rank on another machine
    (a loopback --control-host given to ranks on several nodes) would wait at a path that is
    not there until the front end gave up on it. Fail now, saying why."""
    addrs = [spec.front_out]
    if 0 <= spec.rank < len(spec.front_in):
        addrs.append(spec.front_in[spec.rank])
    for addr in addrs:
        path = addr[len("ipc://"):] if addr.startswith("ipc://") else None
        if path is not None and not os.path.exists(path):
            raise RuntimeError(
                f"the front end's control socket {path} is not on this machine (or not "
                f"in this rank's view of its files, as in another container): a loopback "
                f"control host serves the ranks of one node only (across nodes give "
                f"--control-host an address of rank 0's node that every node reaches), or "
                f"the front end is gone")


def worker_main(spec: WorkerSpec, key: bytes, init_distributed: bool = True,
                before_exit: Callable[[], int | None] | None = None) -> None:
    """A rank's life: join the process group (unless a launcher such as torchrun already did),
    run its role until the front end says stop, report any failure, exit. ``key``: the
    engine's control key (every message to and from the front end is sealed with it).
    ``before_exit`` may return a non-zero exit status, taken where the rank itself ended
    cleanly (launch/serve.py's rank 0: its front end failed)."""
    import torch
    import torch.distributed as dist

    watch_parent()
    torch.set_num_threads(spec.threads)
    role, index = spec.layout.role_of(spec.rank)
    ctx = zmq.Context()
    if spec.front_out.startswith("tcp://["):  # an IPv6 front end (layouts.zmq_host)
        ctx.setsockopt(zmq.IPV6, 1)
    curve = protocol.curve_keys(key, spec.session) if spec.curve else None
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    secure_client(sock, curve)
    sock.connect(spec.front_out)
    out = Outbox(sock, protocol.Sealer(key, spec.session, spec.rank), spec.rank,
                 protocol.max_from_rank_bytes(spec.engine_cfg.max_model_len))
    code = 0
    try:
        check_front_here(spec)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        device = _device(spec.engine_cfg,
                         spec.rank if spec.local_rank is None else spec.local_rank)
        if init_distributed:
            store = dist.TCPStore(spec.store_host, spec.store_port, is_master=False,
                                  timeout=timeout)
            join_process_group(device, store=store, rank=spec.rank,
                               world_size=spec.layout.world_size, timeout=timeout)
        groups = Groups(spec.layout, spec.micro_batches, timeout, device,
                        spec.engine_cfg.prefill_expert_parallel)
        if role != "ffn":  # it runs prompts, or recomputes preempted sequences in chunks
            from kernels.prefill_attention import preload

            preload(device)
        if role == "ffn":
            from afd.rank_ffn import FFNWorker

            worker = FFNWorker(spec, index, groups, device, out)
        else:
            link = ControlLink(ctx, out, spec.front_in[spec.rank], spec.rank, curve)
            if role == "attention":
                from afd.rank_attention import AttentionWorker

                worker = AttentionWorker(spec, index, groups, device, link)
            else:
                from afd.rank_prefill import PrefillWorker

                worker = PrefillWorker(spec, index, device, link, groups)
        freeze_gc(f"rank {spec.rank} ({role} {index})")  # its model and KV cache are built
        worker.run()
        out.send(protocol.Bye())
    except BaseException as exc:  # report, then die: peers see the error through their timeouts
        code = 1
        msg = f"{type(exc).__name__}: {exc}"
        log.error("rank %d (%s %d) failed: %s\n%s", spec.rank, role, index, msg,
                  traceback.format_exc())
        try:
            out.send(protocol.Error(role, msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    finally:
        ctx.destroy(linger=2000)  # flush what we said, close every socket
        if before_exit is not None:
            status = before_exit()  # always run
            code = code or status or 0
        # Skip interpreter teardown: destroying process groups whose peers died can block.
        os._exit(code)


def describe(model, kv_bytes: int, num_kv_blocks: int = 0) -> dict:
    """What this rank holds, for the front end's checks, router and logs: its KV pool's blocks
    (the router's capacity for it; each rank may have sized its own), how many objects its
    ``freeze_gc`` took out of the garbage collector's passes, and the routed experts of each
    MoE layer where it holds any (``expert_ids``)."""
    info = {"role": model.role, "params": [n for n, _ in model.named_parameters()],
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_bytes": kv_bytes, "num_kv_blocks": num_kv_blocks,
            "gc_frozen": gc.get_freeze_count()}
    held = [layer.mlp.experts.expert_ids for layer in model.all_layers()
            if layer.is_moe and hasattr(layer.mlp, "experts")]
    if held:
        info["expert_ids"] = held
    return info


def freeze_gc(who: str) -> int:
    """Once startup is done in a process afd owns (a rank, the server's front end), as vLLM
    does: collect once, then move every object alive (the model, the tokenizer, the startup
    state) to the garbage collector's permanent generation, which its passes never scan. A full
    pass then walks only what was made since, instead of stalling a step for 150-250 ms now and
    then at batch 256. Frozen objects are still freed by reference counting (only cycles among
    them stay). Never in the offline LLM: that process is the user's. Returns the count."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    log.info("%s: gc.freeze() after startup: %d objects frozen", who, count)
    return count


def _transport_classes(name: str) -> tuple[type, type]:
    """(attention side, FFN side) of the transport called ``name``."""
    if name == "torch":
        from afd.transport import TorchExpertServer, TorchTransport

        return TorchTransport, TorchExpertServer
    if name == "deepep":
        from afd.deepep import DeepEPExpertServer, DeepEPTransport

        return DeepEPTransport, DeepEPExpertServer
    raise ValueError(f"transport must be 'torch' or 'deepep', got {name!r}")


def make_transport(spec: WorkerSpec, groups: Groups, hidden: int, dtype: torch.dtype,
                   device: torch.device):
    attention_side, _ = _transport_classes(spec.transport)
    return attention_side(groups.experts, spec.placement, hidden, dtype, device)


def make_expert_server(spec: WorkerSpec, groups: Groups, hidden: int, dtype: torch.dtype,
                       device: torch.device):
    """The FFN side of ``spec.transport`` (``make_transport`` builds the attention side)."""
    _, ffn_side = _transport_classes(spec.transport)
    return ffn_side(groups.experts, spec.placement, hidden, dtype, device)


def main() -> None:
    """``python -m afd.workers --spec JSON``: how the front end starts each rank (the control
    key in its environment, protocol.KEY_ENV: never on the command line, which any user may
    read)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    worker_main(WorkerSpec.from_json(parser.parse_args().spec), protocol.key_from_env())


if __name__ == "__main__":
    main()
