"""What the lent GPU machine runs (the plan in bench/results/README.md) must not break there in
ways a CPU can show first: its image has neither llguidance nor pyzmq, and a run that loads a
second engine after a first (bench/offline.py --cuda-graphs) needs the first one's memory back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes the packages the device image lacks unimportable in the subprocess.
_ABSENT = """
import sys

import pytest

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("llguidance", "zmq"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
"""

_SINGLE_PROCESS = _ABSENT + """
import json
from afd import LLM, SamplingParams

llm = LLM(device="cpu", seed=0)
prompt = [{"prompt_token_ids": [5, 6, 7]}]
out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                   use_tqdm=False)
try:
    llm.generate(prompt, SamplingParams(max_tokens=2, structured_outputs={"regex": "a+"}),
                 use_tqdm=False)
    constrained = None
except ModuleNotFoundError as exc:
    constrained = exc.name
print(json.dumps({"tokens": len(out[0].outputs[0].token_ids), "constrained": constrained}))
"""


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_single_process_engine_runs_without_llguidance_and_pyzmq() -> None:
    """The single process imports neither (the multi-rank layouts need pyzmq, structured output
    llguidance: bench/gpu_prep.sh carries their wheels to the GPU); a constrained request is
    the one that names llguidance."""
    assert _run(_SINGLE_PROCESS) == {"tokens": 3, "constrained": "llguidance"}


_OFFLINE = """
import gc, importlib.util, json, sys, weakref

sys.path.insert(0, "bench")  # where bench/offline.py finds results_io when run as a script
gc.disable()  # what the first engine holds must go without waiting for the cycle collector
spec = importlib.util.spec_from_file_location("offline", "bench/offline.py")
offline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline)
models = []

class Recorded(offline.LLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models.append(weakref.ref(self.engine.core.runner.model))

offline.LLM = Recorded
prompts = [[5, 6, 7], [8, 9]]
_, tokens, info = offline.run_afd(offline.default_model_path(), prompts, 2, "float32", "cpu",
                                  False)
print(json.dumps({"alive": [m() is not None for m in models], "tokens": tokens,
                  "kv_blocks": info["kv_blocks"]}))
"""


def test_offline_frees_the_first_engine_before_a_second_loads() -> None:
    """bench/offline.py --cuda-graphs loads a second engine after the first: at DeepSeek-V3's
    shapes (bench/gpu_v3_dummy.sh) both sets of weights and KV pools would not fit an H100. The
    first LLM of a process stays reachable through a reference cycle until the collector runs
    (torch imports lazily while it loads), so run_afd collects before it returns."""
    result = _run(_OFFLINE)
    assert result["alive"] == [False]
    assert [len(t) for t in result["tokens"]] == [2, 2] and result["kv_blocks"] > 0


def test_ranks_with_their_own_gpus_vote_over_gloo_and_move_tensors_over_nccl(monkeypatch):
    """Each rank on its own GPU: one process group with gloo for CPU tensors (the step vote, a
    rebalance's tables, which NCCL refuses) and NCCL for CUDA ones; plain NCCL failed the
    first vote of every layout with FFN ranks. Ranks sharing one GPU, or on CPU: gloo."""
    import torch

    from afd.workers import backend_for

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert backend_for(cuda) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert backend_for(cuda) == "gloo"


def _fake_dist(monkeypatch, backend: str, rank: int) -> list:
    """torch.distributed as a rank of ``backend`` sees it, recording every all_reduce."""
    import torch
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None: ("group", tuple(ranks)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce",
                        lambda t, op=None, group=None: calls.append((t.device_tag, group)))
    real_zeros = torch.zeros

    def zeros(*size, device=None, **kwargs):  # no CUDA here: a host tensor named for it
        t = real_zeros(*size, **kwargs)
        t.device_tag = str(device)
        return t

    monkeypatch.setattr(torch, "zeros", zeros)
    return calls


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_the_step_groups_nccl_side_starts_with_every_rank_of_it(monkeypatch, rank):
    """Under cpu:gloo,cuda:nccl the step group's first CUDA call was a live rebalance's
    batched expert moves, between FFN ranks alone: torch leaves a first batched NCCL call that
    not every rank of the group joins undefined (its communicator waits for all). Every
    attention and FFN rank now runs one CUDA all_reduce on it at start; a prefill rank (not in
    it) none."""
    import datetime

    import torch

    from afd.workers import Groups, Layout

    calls = _fake_dist(monkeypatch, "cpu:gloo,cuda:nccl", rank)
    layout = Layout(prefill=1, attention=1, ffn=2)
    groups = Groups(layout, 2, datetime.timedelta(seconds=5), torch.device("cuda", rank))
    assert calls == [(f"cuda:{rank}", groups.step)] and groups.step == ("group", (1, 2, 3))


def test_no_device_collective_where_gloo_moves_everything(monkeypatch):
    """Not on a prefill rank (outside the step group), with one FFN rank, under gloo, or on
    CPU."""
    import datetime

    import torch

    from afd.workers import Groups, Layout

    prefill_rank = _fake_dist(monkeypatch, "cpu:gloo,cuda:nccl", 0)
    Groups(Layout(prefill=1, attention=1, ffn=2), 2, datetime.timedelta(seconds=5),
           torch.device("cuda", 0))
    assert prefill_rank == []
    one_ffn_rank = _fake_dist(monkeypatch, "cpu:gloo,cuda:nccl", 1)
    Groups(Layout(prefill=0, attention=1, ffn=1), 2, datetime.timedelta(seconds=5),
           torch.device("cuda", 1))
    assert one_ffn_rank == []  # its moves are local copies: no communicator it never uses
    calls = _fake_dist(monkeypatch, "gloo", 1)
    Groups(Layout(prefill=0, attention=1, ffn=2), 2, datetime.timedelta(seconds=5),
           torch.device("cuda", 0))
    Groups(Layout(prefill=0, attention=1, ffn=2), 2, datetime.timedelta(seconds=5),
           torch.device("cpu"))
    assert calls == []


def test_a_rank_on_its_own_gpu_makes_it_current_before_joining(monkeypatch):
    """NCCL's batched point-to-point and barriers run on the current CUDA device, which no rank
    set (every rank on cuda:0's context); ranks sharing a GPU (gloo) leave it be."""
    import torch
    import torch.distributed as dist

    from afd import workers

    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set", str(d))))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: events.append(("init", backend, kw["rank"])))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    workers.join_process_group(torch.device("cuda", 3), rank=3)
    assert events == [("set", "cuda:3"), ("init", "cpu:gloo,cuda:nccl", 3)]
    events.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    workers.join_process_group(torch.device("cuda", 0), rank=1)
    workers.join_process_group(torch.device("cpu"), rank=2)
    assert events == [("init", "gloo", 1), ("init", "gloo", 2)]


def test_a_cuda_transfer_is_done_when_its_device_has_run_it(monkeypatch):
    """NCCL's Work.wait() returns at once (it only makes the device's current stream wait for
    the transfer): flagged done there, a KV transfer's seconds were its posting, and one whose
    peer never sent was done at once (its deadline never fired; the rank hung at its next
    synchronizing call instead of failing the request). The flag now waits for the buffer's
    device to finish; a host buffer (gloo, whose wait blocks) is not synchronized."""
    import threading

    import torch

    from afd.kv_transfer import Completion

    events, release = [], threading.Event()

    class Work:  # NCCL's: wait returns before the device has run the receive
        def wait(self):
            events.append("wait")

    def synchronize(device=None):
        events.append(("synchronize", str(device)))
        release.wait(10)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    done = Completion(Work(), torch.device("cuda", 3))
    for _ in range(1000):  # until the thread waits in synchronize (or ended without it)
        if len(events) == 2 or done.done.is_set():
            break
        threading.Event().wait(0.01)
    assert events == ["wait", ("synchronize", "cuda:3")] and not done.is_completed()
    release.set()
    assert done.done.wait(10) and done.is_completed()
    events.clear()
    host = Completion(Work(), torch.device("cpu"))
    assert host.done.wait(10) and host.is_completed() and events == ["wait"]


def test_only_nccl_transfers_of_cuda_buffers_synchronize_their_device():
    """gloo's wait already blocked until the data moved; a device-wide synchronize there would
    hold the flag behind the forward in flight (and breaks another thread's graph capture)."""
    import torch

    from afd.kv_transfer import sync_device

    cuda = torch.device("cuda", 1)
    assert sync_device(cuda, "cpu:gloo,cuda:nccl") == cuda
    assert sync_device(cuda, "nccl") == cuda
    assert sync_device(cuda, "gloo") is None  # ranks sharing one GPU
    assert sync_device(torch.device("cpu"), "cpu:gloo,cuda:nccl") is None


class _CudaLike:
    """A CUDA tensor as the transfer code sees it, without a GPU: its device says cuda, and
    ``to`` gives the real host tensor it stands for (on CPU) or itself (staying on the GPU)."""

    def __init__(self, host):
        import torch

        self.host, self.device = host, torch.device("cuda", 0)
        self.dtype, self.shape = host.dtype, host.shape

    def to(self, device):
        return self if device.type == "cuda" else self.host

    def dim(self):
        return self.host.dim()


def _recording_p2p(monkeypatch, backend: str) -> list:
    """torch.distributed's isend/irecv under ``backend``, recording each buffer's device."""
    import torch.distributed as dist

    from afd import kv_transfer

    class Work:
        def wait(self):
            return True

    sent = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "isend", lambda t, dst, tag=0: sent.append(("send", t)) or Work())
    monkeypatch.setattr(dist, "irecv", lambda t, src, tag=0: sent.append(("recv", t)) or Work())
    monkeypatch.setattr(kv_transfer.torch.cuda, "synchronize", lambda device=None: None)
    return sent


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl"])
def test_a_cuda_kv_transfer_under_gloo_goes_through_host_memory(monkeypatch, backend):
    """gloo's send/recv reads and writes the tensor's address as host memory (its collectives
    stage CUDA tensors, its point-to-point calls do not): ranks sharing one GPU (gloo, the
    GPU box's P/D tests) sent device addresses. Under gloo the buffer is a host copy, received
    into host memory and scattered to the GPU; under NCCL it stays on the GPU."""
    import torch

    from afd.kv_transfer import Pull, post_recv, scatter_kv, send_buffer, wire_device
    from afd.sequence import CoreRequest

    sent = _recording_p2p(monkeypatch, backend)
    staged = backend == "gloo"
    cuda = torch.device("cuda", 0)
    assert wire_device(cuda, backend) == (torch.device("cpu") if staged else cuda)
    assert wire_device(torch.device("cpu"), backend) == torch.device("cpu")
    rows = torch.arange(12.0).view(1, 3, 4)  # [layers, tokens, D]: one MLA layer
    sending = send_buffer(_CudaLike(rows), dst=1, tag=7, request_id="r")
    assert sending.work.done.wait(10) and sending.work.is_completed()
    cache = _CudaLike(torch.zeros(2, 2, 4))  # [blocks, block_size, D]
    if staged:
        assert sent[0][1] is rows  # the host copy went to gloo
        pull = Pull(CoreRequest.__new__(CoreRequest), 0, 3, src=0, tag=7)
        recv = post_recv([cache], pull, [1, 0])
        assert recv.buffer.device.type == "cpu" and tuple(recv.buffer.shape) == (1, 3, 4)
        assert recv.work.done.wait(10)
    else:
        assert isinstance(sent[0][1], _CudaLike)
    real = torch.zeros(2, 2, 4)
    scatter_kv([real], torch.tensor([2, 3, 0]), rows)
    assert real.view(-1, 4)[[2, 3, 0]].equal(rows[0])


@pytest.mark.parametrize("device, given, want", [
    ("cuda", None, False), ("cuda:0", None, False), ("cpu", None, True),
    ("cuda", True, True), ("cpu", False, False)])
def test_cuda_graphs_are_the_default_on_cuda_only(device, given, want) -> None:
    """enforce_eager unset: CUDA graphs of decode steps on CUDA (timed on an H100:
    bench/results/h100_20261127/offline_graphs.log), eager on CPU; a given value stands."""
    from afd.config import resolve_engine_config
    from models.config import load_config
    from models.default_model import default_model_path

    path = default_model_path()
    cfg = resolve_engine_config(path, load_config(path), device=device, enforce_eager=given,
                                num_kv_blocks=32, max_model_len=128)
    assert cfg.enforce_eager is want
