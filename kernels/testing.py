"""Helpers for checking Triton kernels against their torch references.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, i.e. when a ``*_triton``
module is first imported, so a process that has already imported one natively (a GPU test, an
engine test) cannot switch to the interpreter. ``run_in_interpreter`` therefore runs the cases
of a test module in a new process (forked from a server that loaded only torch) with
``TRITON_INTERPRET=1`` and no visible GPU, whatever the parent process has imported, and hands
back one result dict per case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]


def moe_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights (w13 [E, 2I, H], w2 [E, H, I]) for MoE checks and timings, scaled
    so activations stay O(1) and bf16 errors are relative to a meaningful output."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def paged_tables(batch: int, max_blocks: int, block_size: int, table_dtype: str, strided: bool,
                 device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block tables and lengths for paged decode-attention tests: each sequence owns distinct,
    shuffled blocks (entries past its length stay valid ids); lengths are random but for the
    edges: only the current token, a full table, a length ending on a block boundary.
    ``strided``: a column-major table and lengths that are a strided view. Returns (tables
    [B, max_blocks], seq_lens [B] int64, number of cache blocks to allocate)."""
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, device=device)[: batch * max_blocks]
    tables = perm.view(batch, max_blocks).to(getattr(torch, table_dtype))
    seq_lens = torch.randint(1, max_blocks * block_size + 1, (batch,), device=device)
    seq_lens[0] = 1
    if batch > 1:
        seq_lens[1] = max_blocks * block_size
    if batch > 2:
        seq_lens[2] = 2 * block_size
    if strided:
        tables = tables.t().contiguous().t()
        seq_lens = torch.stack([seq_lens, torch.ones_like(seq_lens)], 1)[:, 0]
    return tables, seq_lens, num_blocks


def verify_tables(rows: list[int], max_blocks: int, block_size: int, table_dtype: str,
                  device: str, starts: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block tables and lengths of decode rows grouped by sequence (``kernels.decode_groups``):
    group s is ``rows[s]`` consecutive rows over one sequence's distinct, shuffled blocks, as a
    sequence verifying rows[s] - 1 drafts, lengths start + 1 .. start + rows[s] for a random
    start, but for the edges: the first group starts at one token, the second ends on a full
    table, the third on a block boundary (where they fit); ``starts``: each group's start
    instead. Returns (tables [B, max_blocks],
    seq_lens [B] int64, number of cache blocks to allocate)."""
    num_seqs, cap = len(rows), max_blocks * block_size
    if max(rows) > cap:
        raise ValueError(f"a group of {max(rows)} rows needs more than {cap} positions")
    num_blocks = num_seqs * max_blocks + 3
    perm = torch.randperm(num_blocks, device=device)[: num_seqs * max_blocks]
    tables = perm.view(num_seqs, max_blocks).to(getattr(torch, table_dtype))
    if starts is None:
        starts = [int(torch.randint(0, cap - n + 1, ())) for n in rows]
        starts[0] = 0
        if num_seqs > 1:
            starts[1] = cap - rows[1]
        if num_seqs > 2 and 2 * block_size >= rows[2]:
            starts[2] = 2 * block_size - rows[2]
    seq_lens = torch.tensor([start + 1 + i for start, n in zip(starts, rows) for i in range(n)],
                            device=device)
    sizes = torch.tensor(rows, device=device)
    return tables.repeat_interleave(sizes, dim=0), seq_lens, num_blocks


def poison_stale_rows(cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor) -> int:
    """Fill, in place, every row of a paged cache [num_blocks, block_size, ...] that no row b's
    first ``seq_lens[b]`` positions through ``block_tables[b]`` reach with NaN, +Inf and -Inf
    (in turn, element by element; FP8 e4m3 has no Inf: NaN there): what a freed block of a
    sequence whose numerics blew up, or a rejected draft's rows, may hold. For a GQA cache
    [2, ...] call it on the keys and on the values. Returns how many rows it filled."""
    num_blocks, block_size = cache.shape[:2]
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for table, n in zip(block_tables.tolist(), seq_lens.tolist()):
        pos = torch.arange(n)
        live[torch.tensor(table)[pos // block_size] * block_size + pos % block_size] = True
    stale = (~live).nonzero().squeeze(1).to(cache.device)
    flat = cache.view(num_blocks * block_size, -1)
    special = torch.tensor([float("nan"), float("inf"), float("-inf")])
    pattern = special[torch.arange(stale.numel() * flat.shape[1]) % 3].view(-1, flat.shape[1])
    pattern = pattern.to(cache.dtype).to(cache.device)
    if cache.element_size() == 1:  # FP8: no index_put kernel, so copy the bits
        flat, pattern = flat.view(torch.uint8), pattern.view(torch.uint8)
    flat[stale] = pattern
    return stale.numel()


def largest_tensor(fn, *args, **kwargs) -> int:
    """The most elements of any tensor an op made while ``fn(*args, **kwargs)`` ran (its
    inputs not counted): what bounds the memory a torch path needs beside its inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    Largest.most = max(Largest.most, leaf.numel())
            return out

    with Largest():
        fn(*args, **kwargs)
    return Largest.most


def cuda_scalar_division():
    """A context in which torch code on the CPU rounds a division by a scalar as CUDA does.

    PyTorch's CUDA kernel for ``t / s``, where ``s`` is a Python number or a 0-dim CPU tensor,
    multiplies by the reciprocal of ``s`` instead of dividing: ``s`` is first rounded to the
    compute dtype (fp32 for fp32, bf16, fp16 and integer ``t``, which true division makes fp32;
    fp64 for fp64), and its reciprocal computed in that dtype (``opmath_t(1.0) /
    iter.scalar_value<opmath_t>(2)`` in ATen's div_true_kernel_cuda): one ulp off the quotient
    for many inputs, where the CPU divides. A reference that divides by a scalar so gives other
    bits on a GPU than beside the interpreter; in this context a CPU test sees the GPU's bits
    (``aten.div`` only, not ``div_``/``out=``; every 0-dim tensor counts as a CPU scalar here,
    though one computed on a GPU would be divided by).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class CudaScalarDivision(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar) and not kwargs:
                a, b = args
                scalar = not isinstance(b, torch.Tensor) or (b.dim() == 0
                                                             and b.device.type == "cpu")
                out = torch.result_type(a, b) if isinstance(a, torch.Tensor) else None
                if out is not None and not out.is_floating_point and not out.is_complex:
                    out = torch.get_default_dtype()  # true division of integers
                if scalar and out is not None and out.is_floating_point:
                    compute = torch.float64 if out == torch.float64 else torch.float32
                    # the divisor rounded to the compute dtype first, then its reciprocal there
                    inv = torch.tensor(1.0, dtype=compute) / torch.tensor(float(b), dtype=compute)
                    return (a.to(compute) * inv).to(out)
            return func(*args, **kwargs)

    return CudaScalarDivision()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are all zeros)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    if scale == 0.0:
        return diff
    return diff / scale


FP8_KV = "+fp8kv"  # a case dtype name's suffix: the KV cache in FP8 e4m3 (kv_cache_dtype "fp8")


def case_dtypes(name: str, dtypes: dict[str, torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, KV cache dtype) of a case's dtype name: "bf16" -> (bf16, bf16),
    "bf16+fp8kv" -> (bf16, float8_e4m3fn). The reference reads the same FP8 cache as the
    kernel, so the compute dtype's tolerance applies."""
    base = name.removesuffix(FP8_KV)
    return dtypes[base], torch.float8_e4m3fn if name.endswith(FP8_KV) else dtypes[base]


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error bound for a kernel against its reference at ``dtype``."""
    return {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}[dtype]


def seed_case(name: str, seed: int) -> None:
    """Fresh but reproducible inputs per case: the run's seed mixed with the case's name."""
    torch.manual_seed(seed + zlib.crc32(name.encode()))


def check_result(result: dict, name: str, seed: int) -> None:
    """Assert one case's result dict ({"err", "tol", "dtype_ok"} or {"error"}) passed."""
    assert "error" not in result, f"{name} (seed {seed}) raised:\n{result['error']}"
    assert result["dtype_ok"], f"{name}: output dtype differs from the reference's"
    assert result["err"] < result["tol"], f"{name} (seed {seed}): rel err {result['err']:.3g}"


def run_in_interpreter(module_file: str, case_names: list[str], seed: int,
                       timeout_s: float = 600.0, workers: int | None = None) -> dict[str, dict]:
    """Call ``<module>.interpreter_case(name, seed)`` for each name in fresh interpreter processes.

    Returns {name: result dict}; a case that raised gets {"error": traceback text}. The cases are
    dealt out in turn to ``workers`` processes that run at the same time (default: one per CPU
    this process may use, at most ``MAX_INTERPRETER_WORKERS``, at most one per case): the
    interpreter runs on one core, and the test process waiting for it leaves the others idle.
    The interpreter writes through raw pointers, so an out-of-bounds kernel bug can kill a
    process: then each of its cases is rerun in its own process to say which one did it.
    """
    if workers is None:
        workers = min(_usable_cpus(), MAX_INTERPRETER_WORKERS)
    groups = [case_names[i::workers] for i in range(max(1, min(workers, len(case_names))))]
    results: dict[str, dict] = {}
    for group, outcome in zip(groups, _run_workers(module_file, groups, seed, timeout_s)):
        if isinstance(outcome, dict):
            results.update(outcome)
        elif len(group) == 1:
            results[group[0]] = {"error": str(outcome)}
        else:
            for name in group:
                (alone,) = _run_workers(module_file, [[name]], seed, timeout_s)
                results.update(alone if isinstance(alone, dict) else {name: {"error": str(alone)}})
    return {name: results[name] for name in case_names}


# the most interpreter workers one run_in_interpreter call starts at once
MAX_INTERPRETER_WORKERS = 4


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# The worker process is forked from a fork server (one per calling process, started at the first
# call) that imported torch and nothing else: a fresh Python would spend ~2 s of CPU importing
# torch again for each test module's cases. Nothing in it has read TRITON_INTERPRET (no
# @triton.jit function is defined until a *_triton module loads, in the worker) or initialized
# CUDA, and the worker takes the caller's environment before it loads anything else.
FORKSERVER_PRELOAD = ["torch", "torch.distributed"]


def forkserver_context():
    """The multiprocessing context whose processes fork from that server."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # (a server already running keeps its own)
    return ctx


def _run_workers(module_file: str, groups: list[list[str]], seed: int,
                 timeout_s: float) -> list[dict[str, dict] | RuntimeError]:
    """Each group of cases in an interpreter worker of its own, all started at once: per group,
    its results, or a RuntimeError saying how its worker failed (its log's end). Past
    ``timeout_s`` every worker still running is killed and TimeoutExpired raised."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("AFD_KERNEL_BACKEND", None)
    what = f"interpreter worker for {module_file}"
    with tempfile.TemporaryDirectory() as tmp:
        started = []
        try:
            for i, group in enumerate(groups):
                folder = os.path.join(tmp, str(i))
                os.mkdir(folder)
                out_path = os.path.join(folder, "results.json")
                started.append((_start_forked(_forked_worker, (module_file, out_path, seed, group),
                                              env, str(_REPO_ROOT), folder), out_path))
            deadline = time.monotonic() + timeout_s
            outcomes: list[dict[str, dict] | RuntimeError] = []
            for (proc, log_path), out_path in started:
                code, log = _finish_forked(proc, log_path, deadline, timeout_s, what)
                if code != 0 or not os.path.exists(out_path):
                    outcomes.append(RuntimeError(f"interpreter worker failed (rc {code}):\n"
                                                 f"{log[-8000:]}"))
                    continue
                with open(out_path) as f:
                    outcomes.append(json.load(f))
            return outcomes
        finally:
            for (proc, _), _ in started:  # a timeout: the others too
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def _run_forked(target, args: tuple, env: dict[str, str], first_path: str, tmp: str,
                timeout_s: float, what) -> tuple[int, str]:
    """``target(*args)`` in a process forked from the fork server, with environment ``env``,
    ``first_path`` first on ``sys.path``, the repository root as working folder and its
    output in a log under ``tmp``: (exit status, that output). Past ``timeout_s`` it is
    killed (``what`` names it in the TimeoutExpired)."""
    deadline = time.monotonic() + timeout_s
    return _finish_forked(*_start_forked(target, args, env, first_path, tmp), deadline,
                          timeout_s, what)


def _start_forked(target, args: tuple, env: dict[str, str], first_path: str, tmp: str):
    """Start ``target(*args)`` as ``_run_forked`` runs it: (the process, its log's path)."""
    log_path = os.path.join(tmp, "log.txt")
    proc = forkserver_context().Process(target=_worker_entry,
                                        args=(env, log_path, first_path, target, args))
    proc.start()
    return proc, log_path


def _finish_forked(proc, log_path: str, deadline: float, timeout_s: float,
                   what) -> tuple[int, str]:
    """Wait until ``deadline`` (``time.monotonic``'s) for a process ``_start_forked`` started;
    killed past it (TimeoutExpired naming ``what`` and ``timeout_s``). Returns (exit status,
    its output)."""
    proc.join(max(0.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(what, timeout_s)
    log = Path(log_path).read_text(errors="replace") if os.path.exists(log_path) else ""
    return proc.exitcode, log


def _worker_entry(env: dict, log_path: str, first_path: str, target, args: tuple) -> None:
    """A forked worker: stdout and stderr into ``log_path``, the caller's environment, the
    repository root as working folder, ``first_path`` first on the path, then ``target``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(_REPO_ROOT)
    sys.path.insert(0, first_path)
    target(*args)


def _forked_worker(module_file: str, out_path: str, seed: int, case_names: list[str]) -> None:
    """The interpreter worker (environment: the caller's, interpreter on, no GPU): the cases."""
    _run_cases(module_file, out_path, seed, case_names)


def run_script(path: str, args: list[str], env: dict[str, str],
               timeout_s: float = 300.0) -> tuple[int, str]:
    """``python PATH ARGS`` (a script, run as ``__main__`` with ``sys.argv`` and its folder
    first on ``sys.path`` as Python sets them, in the repository root, with environment ``env``) in
    a process forked from the fork server above instead of a fresh interpreter (whose torch
    import is some 2 s of CPU). Returns its exit status, as the interpreter's (a
    ``SystemExit`` message printed, status 1; an uncaught exception's traceback, status 1),
    and its stdout and stderr together."""
    with tempfile.TemporaryDirectory() as tmp:
        return _run_forked(_script_worker, (path, list(args)), env,
                           os.path.dirname(os.path.abspath(path)),  # a script's folder first
                           tmp, timeout_s, [path, *args])


def _script_worker(path: str, args: list[str]) -> None:
    import runpy

    sys.argv = [path, *args]
    code = 1
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # after what the script printed (stdout is block-buffered into the log file)
            sys.stdout.flush()
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback, status 1
        sys.stdout.flush()
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_cases(module_file: str, out_path: str, seed: int, case_names: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("_kernel_cases", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the module look themselves up here
    spec.loader.exec_module(module)
    results: dict[str, dict] = {}
    for name in case_names:
        try:
            results[name] = module.interpreter_case(name, seed)
        except Exception:  # noqa: BLE001 - reported per case to the parent
            results[name] = {"error": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f)


def start_calls_ahead(module_file: str, module_name: str, calls: list[tuple[int, str, dict]],
                      reached, tmp: str):
    """Start a helper process (forked from the fork server above) that loads the test module
    ``module_file`` as ``module_name`` and calls ``calls`` (index, function name, keyword
    arguments) in the order given, only for what they leave behind (Triton's on-disk cache):
    what a call returns or raises is thrown away. It stops before a call whose index is at or
    below ``reached.value`` (a shared int the caller moves forward: the test process has come
    that far), and after the last. Returns the process; its output goes to a log under ``tmp``.
    """
    return _start_forked(_calls_ahead_worker, (module_file, module_name, calls, reached),
                         dict(os.environ), str(_REPO_ROOT), tmp)[0]


def _calls_ahead_worker(module_file: str, module_name: str, calls: list[tuple[int, str, dict]],
                        reached) -> None:
    spec = importlib.util.spec_from_file_location(module_name, module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    for index, name, kwargs in calls:
        if reached.value >= index:
            break
        try:
            getattr(module, name)(**kwargs)
        except BaseException:  # noqa: BLE001,S110 - a skip, a failed check: the test process's
            pass
    sys.stdout.flush()
    os._exit(0)
