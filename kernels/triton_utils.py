"""Pieces shared by the Triton kernels (imported only by the ``*_triton`` modules)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.backend import interpreter_enabled

# Whether the kernels of the modules importing this one run in Triton's interpreter: read once,
# as these modules load, which is when Triton reads TRITON_INTERPRET for their @triton.jit
# functions (and every MoE call asks, so it must not cost an environment lookup).
INTERPRETING = interpreter_enabled()


def _scalar_index_in_the_interpreter() -> None:
    """Triton's interpreter holds every scalar (a program id, an int argument, a loaded value)
    as a one-element array of shape [1]. In Triton 3.6 its ``tensor.__index__``, which
    ``range(lo, hi, step)`` over runtime bounds calls, is ``int(data)``: NumPy >= 2.4 refuses
    that for an array with a dimension ("only 0-dimensional arrays can be converted to Python
    scalars", triton-lang/triton#9171), so every such loop failed there. No kernel change can
    give the interpreter a 0-d scalar; this reads the one element instead, as the interpreter
    of Triton 3.8 and later does (same value there). Installed only under TRITON_INTERPRET:
    compiled kernels never see it."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "afd_scalar_index", False):
        return

    def index(self) -> int:
        return int(self.handle.data.item())

    def patched(tensor, *scope):  # older Triton patches without a scope
        patch(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched.afd_scalar_index = True
    interpreter._patch_lang_tensor = patched


if INTERPRETING:
    _scalar_index_in_the_interpreter()

LOG2E = tl.constexpr(1.4426950408889634)

DOT_NATIVE = 0  # bf16/fp16 on tensor cores, fp32 accumulation
DOT_IEEE = 1  # fp32 operands: tensor cores would silently round them to tf32
DOT_UPCAST = 2  # bf16 under TRITON_INTERPRET: its dot multiplies raw bf16 bit patterns
#                 (triton-lang/triton#11584), so operands go to fp32 first; products of bf16
#                 values are exact in fp32, so this is the same math as the tensor cores'.


def interp_bf16(dtype: torch.dtype) -> bool:
    """The ``INTERP_BF16`` constexpr: bf16 under TRITON_INTERPRET, whose fp32 -> bf16 cast
    truncates instead of rounding to nearest; kernels round with ``rne_bf16`` first."""
    return dtype == torch.bfloat16 and INTERPRETING


def dot_mode(dtype: torch.dtype) -> int:
    """The ``DOT_MODE`` constexpr for operands of ``dtype`` on the current backend."""
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and INTERPRETING:
        return DOT_UPCAST
    return DOT_NATIVE


@triton.jit
def dot(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation, see ``dot_mode``."""
    if DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def rne_bf16(x, INTERP_BF16: tl.constexpr):
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32, when INTERP_BF16.

    The GPU's fp32 -> bf16 cast already rounds this way; the interpreter's truncates, which would
    double the rounding error the tests see. Identity (no code) when INTERP_BF16 is False.
    """
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def split_bounds(seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of ``split``'s share of ``seq_len`` tokens: whole BLOCK_N steps per split, so only
    a split's last step has masked tokens (empty, lo >= hi, past a short sequence's end)."""
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    return lo, hi


@triton.jit
def row_masked_scores(s, toks, t_ok, row_len, scale_log2):
    """Scores ``s`` [M, N] in log2 units, -inf where token ``toks`` [N] is not in the step
    (``t_ok``) or is past its row's own length (``row_len`` [M]: the grouped kernels' rows)."""
    seen = t_ok[None, :] & (toks[None, :] < row_len[:, None])  # [M, N]
    return tl.where(seen, s * scale_log2, float("-inf"))


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, ROW_MASKED: tl.constexpr, DOT_MODE: tl.constexpr,
                        INTERP_BF16: tl.constexpr):
    """One step of a decode attention's online softmax in fp32 (exp2: ``s`` [M, N] holds scores
    already scaled by log2(e), masked tokens -inf): returns the new (m_i, l_i, acc [M, D]) with
    ``v`` [N, D] weighted in. ROW_MASKED: a row may have no valid token in this step (grouped
    kernels mask each row at its own length), so its m may stay -inf and the exponents use 0
    instead, giving 0, not NaN; without it every step has a valid token for every row."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if ROW_MASKED:
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(rne_bf16(p, INTERP_BF16).to(v.dtype), v, acc * alpha[:, None], DOT_MODE)
    return m_new, l_i, acc


@triton.jit
def softmax_start(sink_ptr, heads, ok, split, M: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(m_i, l_i) [M] an online softmax over rows of query heads ``heads`` [M] starts from.
    HAS_SINKS: split 0 of each row (``ok``) starts from its head's sink logit (``sink_ptr`` [H],
    natural log units): max = the sink in log2 units, sum = exp2(0) = 1, nothing accumulated;
    one more term in the denominator, none in the output, joined once (the splits' combine
    weighs split 0's lse, sink included, as any other). Else empty: max -inf, sum 0."""
    if HAS_SINKS:
        sink = tl.load(sink_ptr + heads, mask=ok, other=float("-inf")).to(tl.float32) * LOG2E
        first = (split == 0) & ok
        m_i = tl.where(first, sink, float("-inf"))
        l_i = tl.where(first, 1.0, 0.0)
    else:
        m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((M,), dtype=tl.float32)
    return m_i, l_i


@triton.jit
def store_attention(acc, m_i, l_i, o_ptrs, lse_ptr, lse_rows, m_ok, d_ok, offs_d, split, dim,
                    NUM_SPLITS: tl.constexpr, INTERP_BF16: tl.constexpr):
    """A decode attention's epilogue for its [M, D] rows: ``o_ptrs`` [M, 1] points at each row's
    output ([.., D] with one split, else its fp32 partials [.., NUM_SPLITS, D]), ``lse_rows`` [M]
    indexes each row's lse ([.., NUM_SPLITS] at ``lse_ptr``, NUM_SPLITS > 1 only). One split:
    the normalized output in the output's dtype. Several: this split's normalized partial and
    log2-sum-exp2; a row with nothing in the split has l_i = 0 and writes zeros and a -inf lse,
    which the combine weighs zero."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_mask = m_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs + offs_d[None, :],
                 rne_bf16(out, INTERP_BF16).to(o_ptrs.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs + split * dim + offs_d[None, :], out, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + lse_rows * NUM_SPLITS + split, lse, mask=m_ok)


@triton.jit
def combine_splits_kernel(
    part_ptr,  # [rows, NUM_SPLITS, dim] fp32, each split's output normalized by its own sum
    lse_ptr,  # [rows, NUM_SPLITS] fp32, each split's log2-sum-exp2 (-inf: an empty split)
    out_ptr,  # [rows, dim] contiguous
    dim,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """Merge the splits of a split-K (flash-decoding) attention: one program per output row
    (a query head of a sequence), each split weighted by its share of the softmax mass,
    exp2(lse_s) / sum_s exp2(lse_s). A row whose splits are all empty gets zeros."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < dim
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    total = tl.sum(weight, 0)
    weight = weight / tl.where(total > 0, total, 1.0)
    part = tl.load(part_ptr + (row * NUM_SPLITS + offs_s[:, None]) * dim + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [S, D]
    out = tl.sum(part * weight[:, None], 0)
    tl.store(out_ptr + row * dim + offs_d,
             rne_bf16(out, INTERP_BF16).to(out_ptr.dtype.element_ty), mask=d_ok)


def split_count(programs: int, max_context: int, sm_count: int, min_tokens: int,
                max_splits: int) -> int:
    """Splits per sequence of a split-K decode attention: about two programs per SM over the
    ``programs`` of one split, each split at least ``min_tokens`` of ``max_context``, at most
    ``max_splits``. Shapes only, never lengths: a CUDA graph replays what it captured."""
    want = -(-2 * sm_count // max(1, programs))
    return max(1, min(want, max_context // min_tokens, max_splits))


def split_buffers(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (part [B, H, S, D], lse [B, H, S]) for the splits of ``out`` [B, H, D]."""
    batch, heads, dim = out.shape
    part = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=out.device)
    lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=out.device)
    return part, lse


def combine_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, d_pad: int) -> None:
    """``out`` [B, H, D] (contiguous) from ``split_buffers`` filled by a split kernel."""
    batch, heads, num_splits, dim = part.shape
    combine_splits_kernel[(batch * heads,)](
        part, lse, out, dim,
        NUM_SPLITS=num_splits, S_PAD=max(2, next_pow2(num_splits)), D_PAD=d_pad,
        INTERP_BF16=interp_bf16(out.dtype), num_warps=4,
    )


def launch_split_attention(kernel, grid: tuple, args: tuple, dims: tuple, out: torch.Tensor,
                           num_splits: int, d_pad: int, common: dict) -> torch.Tensor:
    """Run a split-K decode attention ``kernel`` over ``grid`` as
    ``kernel(*args, out, lse, *dims, out.stride(0), out.stride(1), NUM_SPLITS, INTERP_BF16,
    **common)`` and return ``out`` [B, H, D]: with one split straight into ``out`` (``lse``
    unused), else into ``split_buffers`` merged by ``combine_splits``."""
    if num_splits == 1:
        kernel[grid](*args, out, out, *dims, out.stride(0), out.stride(1),
                     NUM_SPLITS=1, INTERP_BF16=interp_bf16(out.dtype), **common)
        return out
    part, lse = split_buffers(out, num_splits)
    kernel[grid](*args, part, lse, *dims, part.stride(0), part.stride(1),
                 NUM_SPLITS=num_splits, INTERP_BF16=False, **common)
    combine_splits(part, lse, out, d_pad)
    return out


@triton.jit
def gdc_wait(PDL: tl.constexpr):
    """Programmatic dependent launch: block until the previous kernel in the stream has finished
    and its writes are visible. A kernel launched with PDL may start while its predecessor is
    still running, so it calls this before touching any global memory (inputs it reads, and
    outputs whose memory the predecessor may still be using). No code when PDL is False."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream launch (it waits in ``gdc_wait``) once every program of
    this grid has called this or exited: called past a program's main loop, so the next grid's
    launch overlaps this one's epilogue and tail (a warp-specialized kernel calls it at its top:
    Triton's auto-WS drops it after the partitioned loop)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 go through
# Triton's JIT-function wrapper, several microseconds a call, and a MoE call makes a dozen.
def check_paged_kv(q: torch.Tensor, kv_cache: torch.Tensor, q_layout: str) -> None:
    """ValueError unless ``kv_cache`` is a GQA paged cache [2, num_blocks, block_size, KVH, D]
    for queries ``q`` [..., H, D] (H a multiple of KVH) of its dtype, or FP8 (an FP8 KV cache);
    ``q_layout`` names q's
    dims in the message."""
    num_heads, dim = q.shape[-2:]
    if (kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[-1] != dim
            or kv_cache.shape[3] == 0 or num_heads % kv_cache.shape[3]):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)} {q_layout}, kv_cache "
                         f"{tuple(kv_cache.shape)} must be [2, num_blocks, block_size, KVH, D] "
                         "with H a multiple of KVH")
    if kv_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache must be of q's dtype or FP8 (float8_e4m3fn), got q "
                         f"{q.dtype}, kv_cache {kv_cache.dtype}")


def unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor as is where its last dim has unit stride (what the kernels index with an
    arange), else a contiguous copy."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n, as triton.next_power_of_2 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# the window a windowed attention kernel takes for full attention: no row's window starts past 0
FULL = 1 << 30


def pdl_kwargs(pdl: bool) -> dict:
    """Launch options for a kernel compiled with ``PDL=pdl``."""
    return {"launch_pdl": True} if pdl else {}


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); 3 under the interpreter or on the CPU,
    so that persistent kernels' tile loops run more than one iteration in tests."""
    if device.type != "cuda" or INTERPRETING:
        return 3
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give Triton an allocator for kernels that need global scratch memory (device-side TMA
    descriptors, ``tl.make_tensor_descriptor``: 128 bytes a program) in this thread, unless one is
    set already (by the caller, vLLM, ...). Triton keeps it in a context variable, so each thread
    that launches such a kernel needs its own. Torch's caching allocator serves it (graph pools
    included, so capture works)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


# Below every @triton.jit function of this module: a compiled kernel's cache key includes the
# line numbers of the functions it calls, so code added above them recompiles every kernel once.

def _patch_lang_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` (every builtin of tl, tl.core, tl.tensor
    and tl.math, found with ``inspect.getmembers``) at each kernel launch, and undoes it when the
    launch ends. It also calls the same ``_patch_lang`` at each call of a @triton.jit helper
    inside the kernel, and discards that scope. Within a launch whose patch already covers the
    helper's language modules, that second patch changes nothing: the builtins it looks for are
    already replaced (it skips them), and what it sets unconditionally (range, static_assert, the
    tensor dunders, ...) is the same behaviour the launch set. But the member walk is ~40% of an
    interpreted MoE call (thousands of helper calls per launch): the test suite's interpreter runs
    and the bench scripts' ``--smoke`` runs spend most of their time there. This skips the
    repeated patch; a helper that sees a language module the launch did not patch (tl.core from
    tl.standard) is patched as before. Installed only under TRITON_INTERPRET."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if (patch is None or scope_type is None or executor is None
            or getattr(patch, "afd_once_per_launch", False)):
        return
    langs_of: dict = {}  # fn -> the language modules in its globals (what _patch_lang patches)
    launch: dict = {"on": False, "patched": set()}  # ids of the modules this launch patched
    launch_call = executor.__call__

    def launched(self, *args, **kwargs):
        launch["on"], launch["patched"] = True, set()
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            launch["on"], launch["patched"] = False, set()

    def once(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = frozenset(
                id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        if launch["on"] and langs and langs <= launch["patched"]:
            return scope_type()  # nothing to change (and nothing to undo)
        scope = patch(fn)
        if launch["on"]:
            launch["patched"] |= langs
        return scope

    executor.__call__ = launched
    once.afd_once_per_launch = True
    interpreter._patch_lang = once


if INTERPRETING:
    _patch_lang_once_per_launch()
