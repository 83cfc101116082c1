"""Backend choice for the kernels: torch on CPU, Triton on CUDA, clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.backend import interpreter_enabled, resolve_backend, triton_available


def test_cpu_tensors_use_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    assert kernels.resolve_backend(None, x) == "torch"
    assert resolve_backend(None) == "torch"
    assert resolve_backend("torch", x) == "torch"


def test_bad_backend_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(1))
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="tritonn"):
        resolve_backend(None, torch.zeros(1))


def test_env_overrides_default_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "torch")
    assert resolve_backend(None, torch.zeros(1)) == "torch"
    assert resolve_backend("torch", torch.zeros(1)) == "torch"


@pytest.mark.skipif(not triton_available() or interpreter_enabled(),
                    reason="needs triton importable and TRITON_INTERPRET unset")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))


def test_public_ops_route_to_torch_on_cpu() -> None:
    x = torch.randn(3, 8)
    out, summed = kernels.rms_norm(x, torch.ones(8), 1e-6, torch.zeros(3, 8))
    assert torch.equal(summed, x) and out.shape == x.shape


def test_import_does_not_load_triton_kernels() -> None:
    # TRITON_INTERPRET is read when a @triton.jit function is defined, so ``import kernels``
    # must not define any: the *_triton modules load on first use. Checked in a fresh process
    # because this one may have loaded them already.
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, kernels; "
            "bad = [m for m in sys.modules if m.startswith('kernels.') and m.endswith('triton')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    x = torch.zeros(2, 3, device="cuda")
    assert resolve_backend(None, x) == ("triton" if triton_available() else "torch")
    assert resolve_backend(None, x, torch.zeros(1)) == "torch"  # mixed devices: no Triton


_NESTED_CALLS = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from triton.runtime import interpreter

real = []  # the language patches Triton really made
original = interpreter._patch_lang
interpreter._patch_lang = lambda fn: real.append(fn.__name__) or original(fn)
import kernels.triton_utils  # noqa: F401 (installs the once-per-launch patch over the above)


@triton.jit
def twice(x):
    return tl.maximum(x, 0.0) * 2.0  # a builtin inside a helper


@triton.jit
def kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for _ in range(5):
        x = twice(x) - tl.sigmoid(x)  # tl.sigmoid: a tl.standard helper (its module sees core)
    tl.store(out_ptr + offs, x)


x = torch.randn(16)
for _ in range(2):
    out = torch.empty_like(x)
    kernel[(3,)](x, out, 16)
    want = x.clone()
    for _ in range(5):
        want = torch.clamp(want, min=0) * 2 - torch.sigmoid(want)
    torch.testing.assert_close(out, want)
# the launch's patch undone (Triton itself leaves a helper's patch of tl.core in place)
assert tl.core.is_builtin(tl.load), "triton.language left patched"
print(len(real), sorted(set(real)))
"""


def test_the_interpreter_patches_the_language_once_per_launch() -> None:
    """kernels.triton_utils makes Triton's interpreter patch triton.language once per launch
    (and once more for a helper whose module sees a language module the launch did not patch:
    tl.standard's, which sees tl.core), not again at each @triton.jit helper call: the repeated
    member walk was ~40% of an interpreted MoE call. Results as before, the language restored
    after each launch. Checked in a fresh process (TRITON_INTERPRET is read as kernels load)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _NESTED_CALLS], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    count, names = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    # 2 launches x (the kernel + the first tl.standard helper); 62 without (every helper call)
    assert int(count) <= 4, proc.stdout
    assert "kernel" in names


# interpreter cases for run_in_interpreter's own test: each records its process and its
# environment; "meet_*" wait for each other (so they run at the same time or not at all),
# "crash" kills its worker
CASES_MODULE = '''
import os, time


def interpreter_case(name, seed):
    out = {"pid": os.getpid(), "interpret": os.environ.get("TRITON_INTERPRET"), "seed": seed}
    if name == "crash":
        os._exit(3)
    if name.startswith("meet_"):
        folder = os.environ["AFD_TEST_MEET"]
        open(os.path.join(folder, name), "w").close()
        other = "meet_b" if name == "meet_a" else "meet_a"
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(folder, other)) and time.monotonic() < deadline:
            time.sleep(0.01)
        out["met"] = os.path.exists(os.path.join(folder, other))
    if name == "raises":
        raise ValueError("case broke")
    return out
'''


def test_run_in_interpreter_deals_the_cases_to_workers_running_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases go in turn to one worker per usable CPU (at most MAX_INTERPRETER_WORKERS),
    which run at the same time; results come back by name, in the order asked; a case that
    raises reports its traceback; a worker that dies has each of its cases rerun alone, so the
    one that killed it is named and the others still pass."""
    from kernels import testing

    module = tmp_path / "cases.py"
    module.write_text(CASES_MODULE)
    monkeypatch.setenv("AFD_TEST_MEET", str(tmp_path))
    monkeypatch.setattr(testing, "_usable_cpus", lambda: 2)
    names = ["meet_a", "meet_b", "c", "raises"]
    results = testing.run_in_interpreter(str(module), names, seed=7)
    assert list(results) == names
    assert results["meet_a"]["met"] and results["meet_b"]["met"], results  # at the same time
    assert results["meet_a"]["pid"] == results["c"]["pid"] != results["meet_b"]["pid"]
    assert {r["interpret"] for n, r in results.items() if n != "raises"} == {"1"}
    assert results["c"]["seed"] == 7 and "case broke" in results["raises"]["error"]
    monkeypatch.setattr(testing, "_usable_cpus", lambda: 64)
    many = testing.run_in_interpreter(str(module), [f"x{i}" for i in range(9)], seed=0)
    assert len({r["pid"] for r in many.values()}) == testing.MAX_INTERPRETER_WORKERS
    crashed = testing.run_in_interpreter(str(module), ["a", "b", "crash", "d"], seed=0,
                                         workers=2)
    assert "rc 3" in crashed["crash"]["error"], crashed["crash"]
    assert all("error" not in crashed[n] for n in ("a", "b", "d")), crashed
