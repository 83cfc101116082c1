"""One output tile of each routed-expert GEMM: main loops and epilogues (Triton).

Used by the kernels in ``moe_gemm_triton``, which decide which tiles a program computes (one, or
a persistent loop of them) and where their rows are. Operands: activation rows through pointers
(they may be gathered), expert weights through pointers or a TMA descriptor (W_TMA); fp32
accumulation. The epilogues round where the torch reference materializes a tensor in the
activation dtype. Their options are constexpr flags, so a kernel without them compiles the code
it did before: swiglu_limit's clamp (CLAMP), gpt-oss's activation (ALPHA) and per-expert biases
(HAS_BIAS: w13's before the activation, w2's before the routing weight).

FP8 (block-scaled e4m3, ``kernels.fp8``): activations and weights are both float8 and each K
step multiplies its fp32 dot product by the row's activation scale times each column's weight
block scale before adding it to the accumulator (as vLLM's and SGLang's w8a8 block kernels do);
BLOCK_K divides GROUP_K, so a step never straddles two scale groups.

MXFP4 (MX: weight-only, ``kernels.mxfp4``): the weights are packed e2m1 bytes [N, K/2] with one
E8M0 byte per 32 values along K. Each K step loads its [BLOCK_N, BLOCK_K/2] bytes and their
[BLOCK_N, BLOCK_K/32] scale bytes through pointers, decodes both nibbles from their bits (low
nibble = even column, ``tl.interleave``), multiplies by 2^(scale - 127) in fp32 (exact), casts to
the activation dtype (exact wherever the torch reference's cast is) and runs the plain dot, so a
tile computes what the weights dequantized by ``kernels.mxfp4.dequantize`` give. BLOCK_K is a
multiple of 32 (K is, too), so a step never splits a scale group.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_utils import dot, rne_bf16


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 x rounded to ``dtype``'s precision, kept in fp32 (no-op for fp32)."""
    return rne_bf16(x, INTERP_BF16).to(dtype).to(tl.float32)


@triton.jit
def w13_src(first, rows, slots, num_rows, ROUTE: tl.constexpr, TOP_K: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """The activation row each grouped row of the block reads."""
    if ROUTE >= 2:
        return slots // TOP_K  # the token of each slot (0 for padding rows)
    # Padding rows re-read a valid row instead of masking every load; they are never stored.
    return tl.where(tl.arange(0, BLOCK_M) < rows, slots, tl.minimum(first, num_rows - 1))


@triton.jit
def scaled_dot(a, b, acc, k, a_scales, w_scales, FP8: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_K: tl.constexpr, DOT_MODE: tl.constexpr):
    """acc + a @ b for K step ``k``; with FP8, a and b are float8 and the step's product is
    scaled by a_scales[:, group] * w_scales[None, group] (pointer vectors [BM] and [BN], at the
    first K group)."""
    if FP8:
        group = (k * BLOCK_K) // GROUP_K
        a_s = tl.load(a_scales + group)  # [BM]
        w_s = tl.load(w_scales + group)  # [BN]
        # Scaled element by element: a [BM, BN] tile of a_s * w_s products would hold as many
        # registers as the accumulator.
        return acc + tl.dot(a, b) * a_s[:, None] * w_s[None, :]
    return dot(a, b, acc, DOT_MODE)


@triton.jit
def e2m1_values(nibbles):
    """uint32 e2m1 codes (bit 3 sign, bits 2..1 exponent with bias 1, bit 0 mantissa) -> fp32,
    built from their bits: exponent field 0 is 0 or 0.5, otherwise 2^(e-1) * (1 + m/2) (fp32
    exponent e + 126, the mantissa bit at bit 22)."""
    exp = (nibbles >> 1) & 3
    man = nibbles & 1
    mag = tl.where(exp == 0, man * 0x3F000000, ((exp + 126) << 23) | (man << 22))
    return (mag | ((nibbles & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_values(s):
    """uint32 E8M0 bytes -> fp32 2^(s - 127) from the bits (byte 0: 2^-127, an fp32 subnormal;
    0xFF, NaN in the spec, is refused where checkpoints are read)."""
    return tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def mx_weight_tile(b_ptrs, s_ptrs, k_left, dtype: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """[BLOCK_K, ROWS] in ``dtype``: the K step's MXFP4 weights dequantized, from ``b_ptrs``
    [ROWS, BLOCK_K/2] packed bytes (column 2j in byte j's low nibble) and ``s_ptrs`` [ROWS,
    BLOCK_K/32] E8M0 bytes; ``k_left`` columns remain (a multiple of 32; zeros past it)."""
    if EVEN_K:
        packed = tl.load(b_ptrs)
        s = tl.load(s_ptrs)
    else:
        packed = tl.load(b_ptrs, mask=(tl.arange(0, BLOCK_K // 2) < k_left // 2)[None, :],
                         other=0)
        s = tl.load(s_ptrs, mask=(tl.arange(0, BLOCK_K // 32) < k_left // 32)[None, :],
                    other=0)
    packed = packed.to(tl.uint32)
    values = tl.interleave(e2m1_values(packed & 0xF), e2m1_values(packed >> 4))  # [ROWS, BK]
    scale = e8m0_values(s.to(tl.uint32))  # [ROWS, BK/32]
    w = tl.reshape(values, (ROWS, BLOCK_K // 32, 32)) * scale[:, :, None]
    return tl.reshape(w, (ROWS, BLOCK_K)).to(dtype).T


@triton.jit
def w13_mainloop(x_ptr, w, src, expert, n0, hidden, inter, stride_xm, stride_we, stride_wn,
                 as_ptr, ws_ptr, stride_asm, stride_wse, stride_wsn, scale_rows,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, W_TMA: tl.constexpr, DOT_MODE: tl.constexpr,
                 FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128,
                 GROUP_K: tl.constexpr = 128, MX: tl.constexpr = False):
    """Two [BM, BN] fp32: x rows ``src`` times gate columns n0.., and times up columns n0..
    (K = H), from one dot over a [BK, 2BN] weight tile. FP8: ``as_ptr`` [rows, H/GROUP_K]
    scales of x's rows, ``ws_ptr`` [E, 2 * scale_rows, H/GROUP_K] of the weight blocks (gate
    block rows, then up block rows). MX: ``w`` [E, 2I, H/2] packed MXFP4 bytes (strides in
    bytes) and ``ws_ptr`` [E, 2I, H/32] their E8M0 bytes (unit stride along the last dim)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    # Column c of the [BK, 2*BN] weight tile: gate row n0 + c, then up row I + n0 + c - BN.
    # Columns past I wrap to valid rows; their results are never stored.
    cols = tl.arange(0, 2 * BLOCK_N)
    half, col_rows = cols // BLOCK_N, (n0 + cols % BLOCK_N) % inter
    if MX:  # [2BN, BK/2] bytes and [2BN, BK/32] scales of the tile's weight rows
        w_rows = (half * inter + col_rows).to(tl.int64)
        b_ptrs = (w + expert.to(tl.int64) * stride_we + w_rows[:, None] * stride_wn
                  + tl.arange(0, BLOCK_K // 2)[None, :])
        mx_scales = (ws_ptr + expert.to(tl.int64) * stride_wse + w_rows[:, None] * stride_wsn
                     + tl.arange(0, BLOCK_K // 32)[None, :])
    elif not W_TMA:
        b_ptrs = (w + expert.to(tl.int64) * stride_we + (half * inter + col_rows)[None, :]
                  * stride_wn + offs_k[:, None])  # [BK, 2BN]
    a_scales = as_ptr + src.to(tl.int64) * stride_asm  # [BM] (FP8 only)
    w_scales = (ws_ptr + expert.to(tl.int64) * stride_wse
                + (half * scale_rows + col_rows // GROUP_N) * stride_wsn)  # [2BN] (FP8 only)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < hidden - k * BLOCK_K)[None, :], other=0.0)
        if MX:
            b = mx_weight_tile(b_ptrs, mx_scales, hidden - k * BLOCK_K,
                               x_ptr.dtype.element_ty, 2 * BLOCK_N, BLOCK_K, EVEN_K)
            acc = dot(a, b, acc, DOT_MODE)
            b_ptrs += BLOCK_K // 2
            mx_scales += BLOCK_K // 32
        else:
            if W_TMA:
                # [1, 2, BN, BK] -> [2BN, BK]: gate rows then up rows; zeros past I and past H.
                b = w.load([expert, 0, n0, k * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=(offs_k < hidden - k * BLOCK_K)[:, None], other=0.0)
            acc = scaled_dot(a, b, acc, k, a_scales, w_scales, FP8, BLOCK_K, GROUP_K, DOT_MODE)
            if not W_TMA:
                b_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))


@triton.jit
def w13_mainloop_ws(x, w, first, expert, n0, hidden, inter, num_rows, stride_xm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_MODE: tl.constexpr):
    """``w13_mainloop`` for grouped rows, warp-specialized (``GemmTile.ws``): x [num_rows, H]
    rows (a pointer: its TMA descriptor, blocks [BM, BK], is made here, on the device, so that
    Triton's split of a 128-row tile between its consumer warp groups also splits the box; see
    ``moe_gemm_triton.WS_MAX_BLOCK_M``) and w [E, 2I, H], a TMA descriptor (blocks [1, BN,
    BK]). Rows past the block's own
    (the next expert's, or zeros past the end) are computed and never stored; gate columns past
    I read up rows, never stored either. Two dots, one per half: Triton's Hopper auto-WS splits
    the accumulators across its consumer warp groups and cannot split a reshaped one."""
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xd = tl.make_tensor_descriptor(x, [num_rows, hidden], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    for k in tl.range(0, tl.cdiv(hidden, BLOCK_K), warp_specialize=True):
        a = xd.load([first, k * BLOCK_K])
        wg = w.load([expert, n0, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        wu = w.load([expert, inter + n0, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        gate = dot(a, wg, gate, DOT_MODE)
        up = dot(a, wu, up, DOT_MODE)
    return gate, up


@triton.jit
def w13_store(gate, up, h_ptr, first, rows, n0, inter, stride_hm, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, INTERP_BF16: tl.constexpr, limit=0.0,
              CLAMP: tl.constexpr = False, bias_ptr=None, expert=0, alpha=0.0,
              HAS_BIAS: tl.constexpr = False, ALPHA: tl.constexpr = False):
    # Round where the reference (Hugging Face's eager expert) materializes a tensor in the
    # activation dtype: gate and up, SiLU(gate), the product. Free in the epilogue, and the
    # engine's greedy tokens then track the reference's closely. HAS_BIAS (gpt-oss): expert's
    # row of bias_ptr [E, 2I] (gate's I, then up's I) added in fp32 before that rounding, as
    # F.linear with a bias. CLAMP (DeepSeek-V4's and gpt-oss's swiglu_limit): gate clamped to
    # <= limit, up to [-limit, limit], after it. ALPHA (gpt-oss's swiglu_alpha): the activation
    # (up + 1) * gate * sigmoid(alpha * gate), rounded after each op as torch computes it.
    dtype = h_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert.to(tl.int64) * 2 * inter + offs_n  # [BN]
        n_ok = offs_n < inter
        gate += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        up += tl.load(b_ptrs + inter, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    gate = round_to(gate, dtype, INTERP_BF16)
    up = round_to(up, dtype, INTERP_BF16)
    if CLAMP:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ALPHA:
        sig = round_to(tl.sigmoid(round_to(gate * alpha, dtype, INTERP_BF16)), dtype,
                       INTERP_BF16)
        act = round_to(up + 1.0, dtype, INTERP_BF16) * round_to(gate * sig, dtype, INTERP_BF16)
    else:
        act = round_to(gate * tl.sigmoid(gate), dtype, INTERP_BF16) * up
    h_ptrs = h_ptr + (first + offs_m).to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, rne_bf16(act, INTERP_BF16).to(dtype),
             mask=(offs_m < rows)[:, None] & (offs_n < inter)[None, :])


@triton.jit
def w2_mainloop(h_ptr, w, first, rows, expert, n0, num_k, num_rows, hidden, inter, stride_hm,
                stride_we, stride_wn, as_ptr, ws_ptr, stride_asm, stride_wse, stride_wsn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, W_TMA: tl.constexpr,
                DOT_MODE: tl.constexpr, FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128,
                GROUP_K: tl.constexpr = 128, MX: tl.constexpr = False):
    """[BM, BN] fp32: h rows first.. (grouped order) times W2[expert] columns n0.. (K = I).
    FP8: ``as_ptr`` [num_rows, I/GROUP_K] scales of h's rows, ``ws_ptr`` [E, H/GROUP_N,
    I/GROUP_K] of the weight blocks. MX: ``w`` [E, H, I/2] packed MXFP4 bytes and ``ws_ptr``
    [E, H, I/32] their E8M0 bytes (``w13_mainloop``)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Padding rows re-read a valid row instead of masking every load; they are never stored.
    a_rows = tl.where(offs_m < rows, first + offs_m, tl.minimum(first, num_rows - 1))
    a_ptrs = h_ptr + a_rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :]  # [BM, BK]
    w_cols = (n0 + tl.arange(0, BLOCK_N)) % hidden  # columns past H wrap, never stored
    if MX:  # [BN, BK/2] bytes and [BN, BK/32] scales of the tile's weight rows
        b_ptrs = (w + expert.to(tl.int64) * stride_we + w_cols.to(tl.int64)[:, None] * stride_wn
                  + tl.arange(0, BLOCK_K // 2)[None, :])
        mx_scales = (ws_ptr + expert.to(tl.int64) * stride_wse
                     + w_cols.to(tl.int64)[:, None] * stride_wsn
                     + tl.arange(0, BLOCK_K // 32)[None, :])
    elif not W_TMA:
        b_ptrs = (w + expert.to(tl.int64) * stride_we
                  + w_cols[None, :] * stride_wn + offs_k[:, None])  # [BK, BN]
    a_scales = as_ptr + a_rows.to(tl.int64) * stride_asm  # [BM] (FP8 only)
    w_scales = ws_ptr + expert.to(tl.int64) * stride_wse + (w_cols // GROUP_N) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(num_k):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < inter - k * BLOCK_K)[None, :], other=0.0)
        if MX:
            b = mx_weight_tile(b_ptrs, mx_scales, inter - k * BLOCK_K, h_ptr.dtype.element_ty,
                               BLOCK_N, BLOCK_K, EVEN_K)
            acc = dot(a, b, acc, DOT_MODE)
            b_ptrs += BLOCK_K // 2
            mx_scales += BLOCK_K // 32
        else:
            if W_TMA:
                # zeros past H and past I
                b = w.load([expert, n0, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=(offs_k < inter - k * BLOCK_K)[:, None], other=0.0)
            acc = scaled_dot(a, b, acc, k, a_scales, w_scales, FP8, BLOCK_K, GROUP_K, DOT_MODE)
            if not W_TMA:
                b_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def w2_mainloop_ws(h, w, first, expert, n0, num_k, num_rows, inter, stride_hm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_MODE: tl.constexpr):
    """``w2_mainloop`` warp-specialized, as ``w13_mainloop_ws``: h [num_rows, I] rows (a
    pointer; its descriptor made here) and w [E, H, I], a TMA descriptor (blocks [1, BN, BK])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hd = tl.make_tensor_descriptor(h, [num_rows, inter], [stride_hm, 1], [BLOCK_M, BLOCK_K])
    for k in tl.range(0, num_k, warp_specialize=True):
        a = hd.load([first, k * BLOCK_K])
        b = w.load([expert, n0, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        acc = dot(a, b, acc, DOT_MODE)
    return acc


@triton.jit
def w2_store(acc, out_ptr, weights_ptr, dest, rows, room, n0, hidden, stride_om,
             HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             INTERP_BF16: tl.constexpr, bias_ptr=None, expert=0,
             HAS_BIAS: tl.constexpr = False):
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        # gpt-oss: expert's row of bias_ptr [E, H], inside the routing-weighted product below
        # (y = w * (h W2^T + b)), in fp32 before the expert output's rounding, as F.linear.
        b = tl.load(bias_ptr + expert.to(tl.int64) * hidden + offs_n, mask=offs_n < hidden,
                    other=0.0)
        acc += b.to(tl.float32)[None, :]
    if HAS_WEIGHTS:
        # As the reference: expert output and routing weight in the output dtype, then multiply.
        dtype = out_ptr.dtype.element_ty
        rw = round_to(tl.load(weights_ptr + dest, mask=row_ok, other=0.0).to(tl.float32), dtype,
                    INTERP_BF16)
        acc = round_to(acc, dtype, INTERP_BF16) * rw[:, None]
    acc = tl.where(row_ok[:, None], acc, 0.0)  # slab padding rows are written as zeros
    out_ptrs = out_ptr + dest.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, rne_bf16(acc, INTERP_BF16).to(out_ptr.dtype.element_ty),
             mask=(offs_m < room)[:, None] & (offs_n < hidden)[None, :])
