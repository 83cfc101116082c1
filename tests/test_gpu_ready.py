"""What the lent GPU machine runs (the plan in bench/results/README.md) must not break there in
ways a CPU can show first: its image has neither llguidance nor pyzmq, and a run that loads a
second engine after a first (bench/offline.py --cuda-graphs) needs the first one's memory back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes the packages the device image lacks unimportable in the subprocess.
_ABSENT = """
import sys

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
