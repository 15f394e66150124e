"""Triton kernels for the dropless, variable-k sparse expert MLP (forward and backward).

The (token, expert) pairs with a nonzero gate are sorted by expert (`build_dispatch_plan`). Every kernel works on
that list directly: grouped GEMMs gather token rows by index, each program finds its expert and row block from the
expert end-offsets on the device, and per-pair results are summed per token by a deterministic reduction kernel (no
atomics, so forward and backward are bitwise reproducible). Nothing is padded and no token is dropped.

Forward (P pairs, tensors in the input dtype unless noted):
    `_gate_up_swiglu_kernel`   x[token] @ W_gate_up[e].T  -> gate_up (P, 2I, saved for backward), h = silu(gate) * up (P, I)
    `_grouped_matmul_kernel`   gate[p] * h @ W_down[e].T  -> per-pair output (P, H) in fp32
    `_token_sum_kernel`        sum of each token's pair rows -> output (T, H)
Backward:
    `_down_backward_kernel`    dy[token] @ W_down[e] -> d_gate_up (P, 2I) through the SiLU-gated product, and partial
                               sums of the gate gradient <dy[token], W_down[e] h>
    `_weight_grad_kernel`      per expert, sum over its pairs: d W_down[e] = (gate * dy[token]).T @ h and
                               d W_gate_up[e] = d_gate_up.T @ x[token]
    `_grouped_matmul_kernel` + `_token_sum_kernel`  d x = sum over a token's pairs of d_gate_up @ W_gate_up[e]

All products accumulate in fp32. The forward and backward are `torch.library.custom_op`s with a registered autograd
formula and fake implementations, so they also run under `torch.compile`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .torch_moe import build_dispatch_plan

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(hopper: list[tuple[int, ...]], keys: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configs `(*block sizes, num_warps, num_stages)`; one small config in the interpreter."""
    if _INTERPRET:
        return [triton.Config(dict.fromkeys(keys, 16), num_warps=1, num_stages=1)]
    return [
        triton.Config(dict(zip(keys, blocks[:-2], strict=True)), num_warps=blocks[-2], num_stages=blocks[-1])
        for blocks in hopper
    ]


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# Two fp32 accumulators (gate and up) per program: keep BLOCK_N at 128 or below.
_GATE_UP_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)], _MNK
)
_MATMUL_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)], _MNK
)
_DOWN_BACKWARD_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)], _MNK
)
_WEIGHT_GRAD_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3)], _MNK
)
# The gate-gradient partial sums get one row per column block of `_down_backward_kernel`: size for the smallest.
_DOWN_BACKWARD_MIN_BLOCK_N = min(config.kwargs["BLOCK_N"] for config in _DOWN_BACKWARD_CONFIGS)
_TOKEN_SUM_BLOCK_H = 16 if _INTERPRET else 1024
_GROUP_M = 2 if _INTERPRET else 8
_AUTOTUNE_KEY = ["N", "K", "pairs_bucket"]


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1D program id to (row block, column block), GROUP_M row blocks at a time for L2 reuse."""
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows
    return pid_m, pid_n


@triton.jit
def _expert_row_block(pid_m, offsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The expert and pair range of row block `pid_m`, where each expert's pairs are cut into BLOCK_M-row blocks.

    Returns `(expert, row_start, row_end)`; `row_start >= row_end` for blocks past the last one.
    """
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + experts, mask=experts < num_experts, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=(experts > 0) & (experts < num_experts), other=0)
    blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cumulative_blocks = tl.cumsum(blocks, 0)
    expert = tl.sum((cumulative_blocks <= pid_m).to(tl.int32), 0)
    is_expert = experts == expert
    first_block = tl.sum(tl.where(is_expert, cumulative_blocks - blocks, 0), 0)
    row_start = tl.sum(tl.where(is_expert, starts, 0), 0) + (pid_m - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(is_expert, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """`acc + a @ b` in fp32; UPCAST_DOT feeds fp32 operands (the interpreter multiplies bf16 operands wrongly)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _matmul_rows(
    a_ptr,
    a_rows,
    row_mask,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    cols,
    col_mask,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """fp32 `a[a_rows, :] @ b[:, cols]` over the full K dimension."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_GATE_UP_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr,
    w_ptr,
    token_idx_ptr,
    offsets_ptr,
    gate_up_ptr,
    h_ptr,
    num_experts,
    num_pairs,
    N,
    K,
    pairs_bucket,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_gp,
    stride_hp,
    STORE_GATE_UP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`gate_up[p] = x[token[p]] @ W[e].T` and `h[p] = silu(gate) * up` for the pairs of expert e; N = I, K = H."""
    num_pid_m = tl.cdiv(num_pairs, BLOCK_M) + tl.minimum(num_experts, num_pairs)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_block(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk
    w_gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    w_up_ptrs = w_gate_ptrs + N * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        w_mask = k_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc_gate = _dot(x, tl.load(w_gate_ptrs, mask=w_mask, other=0.0), acc_gate, DOT_PRECISION, UPCAST_DOT)
        acc_up = _dot(x, tl.load(w_up_ptrs, mask=w_mask, other=0.0), acc_up, DOT_PRECISION, UPCAST_DOT)
        x_ptrs += BLOCK_K * stride_xk
        w_gate_ptrs += BLOCK_K * stride_wk
        w_up_ptrs += BLOCK_K * stride_wk

    out_mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    # h from the rounded gate and up that the backward will read, so that it differentiates this very h
    gate = acc_gate.to(h_ptr.dtype.element_ty)
    up = acc_up.to(h_ptr.dtype.element_ty)
    if STORE_GATE_UP:
        gate_up_ptrs = gate_up_ptr + rows[:, None] * stride_gp + cols[None, :]
        tl.store(gate_up_ptrs, gate, mask=out_mask)
        tl.store(gate_up_ptrs + N, up, mask=out_mask)
    gate = gate.to(tl.float32)
    h = gate * tl.sigmoid(gate) * up.to(tl.float32)
    tl.store(h_ptr + rows[:, None] * stride_hp + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_MATMUL_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _grouped_matmul_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    row_scale_ptr,
    num_experts,
    num_pairs,
    N,
    K,
    pairs_bucket,
    stride_ap,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_op,
    SCALE_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`out[p] = row_scale[p] * a[p] @ b[e]` for the pairs p of expert e, with `b[e]` of shape (K, N)."""
    num_pid_m = tl.cdiv(num_pairs, BLOCK_M) + tl.minimum(num_experts, num_pairs)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_block(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_ptr += expert.to(tl.int64) * stride_be
    acc = _matmul_rows(
        a_ptr, rows, row_mask, stride_ap, stride_ak, b_ptr, stride_bk, stride_bn, cols, col_mask, K,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT,
    )  # fmt: skip
    if SCALE_ROWS:
        acc *= tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_op + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _token_sum_kernel(
    pair_out_ptr, out_ptr, token_offsets_ptr, pair_order_ptr, H, stride_pp, stride_ot, BLOCK_H: tl.constexpr
):
    """`out[t] = sum of pair_out[p]` over the pairs of token t, in a fixed order (zero for a token without experts)."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    first = tl.load(token_offsets_ptr + token)
    last = tl.load(token_offsets_ptr + token + 1)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(first, last):
        pair = tl.load(pair_order_ptr + i).to(tl.int64)
        acc += tl.load(pair_out_ptr + pair * stride_pp + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


# Configs differ in BLOCK_N, hence in which partial-sum rows they write: zero the buffer around the benchmarking.
@triton.autotune(configs=_DOWN_BACKWARD_CONFIGS, key=_AUTOTUNE_KEY, reset_to_zero=["d_gate_partial_ptr"])
@triton.jit
def _down_backward_kernel(
    dy_ptr,
    w_ptr,
    token_idx_ptr,
    offsets_ptr,
    gate_weight_ptr,
    gate_up_ptr,
    d_gate_up_ptr,
    d_gate_partial_ptr,
    num_experts,
    num_pairs,
    N,
    K,
    pairs_bucket,
    stride_dyt,
    stride_dyk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_gp,
    stride_dgp,
    stride_partial,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of the down projection and of the SiLU-gated product; N = I, K = H.

    With `dh = dy[token[p]] @ W_down[e]`: `d_gate_up[p] = (gate[p] * dh) * (silu'(gate_pre) * up, silu(gate_pre))`,
    and this column block's share of the gate gradient `<dh, h[p]>` goes to `d_gate_partial[pid_n, p]`.
    """
    num_pid_m = tl.cdiv(num_pairs, BLOCK_M) + tl.minimum(num_experts, num_pairs)
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _expert_row_block(pid_m, offsets_ptr, num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_ptr += expert.to(tl.int64) * stride_we
    dh = _matmul_rows(
        dy_ptr, tokens, row_mask, stride_dyt, stride_dyk, w_ptr, stride_wk, stride_wn, cols, col_mask, K,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT,
    )  # fmt: skip

    mask = row_mask[:, None] & col_mask[None, :]
    gate_ptrs = gate_up_ptr + rows[:, None] * stride_gp + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    tl.store(d_gate_partial_ptr + pid_n * stride_partial + rows, tl.sum(dh * silu * up, axis=1), mask=row_mask)

    dh *= tl.load(gate_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    d_gate = dh * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    d_up = dh * silu
    d_gate_ptrs = d_gate_up_ptr + rows[:, None] * stride_dgp + cols[None, :]
    tl.store(d_gate_ptrs, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gate_ptrs + N, d_up.to(d_gate_up_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["M", "N", "pairs_bucket"])
@triton.jit
def _weight_grad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    token_idx_ptr,
    offsets_ptr,
    gate_weight_ptr,
    num_experts,
    M,
    N,
    pairs_bucket,
    stride_ap,
    stride_am,
    stride_bp,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    GATHER_A: tl.constexpr,
    SCALE_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SWIGLU_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`out[e] = A_e.T @ B_e` summed over the pairs p of expert e (zero for an expert without pairs), where

    A_e rows are `a[token[p]]` (GATHER_A) or `a[p]`, times `gate[p]` with SCALE_A; B_e rows are `b[token[p]]`
    (GATHER_B), `silu(b[p, :N]) * b[p, N:]` (SWIGLU_B, b = gate_up) or `b[p]`.
    """
    expert = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        pairs = p0 + tl.arange(0, BLOCK_K)
        p_mask = pairs < end
        pairs = pairs.to(tl.int64)
        if GATHER_A or GATHER_B:
            tokens = tl.load(token_idx_ptr + pairs, mask=p_mask, other=0).to(tl.int64)
        a_rows = tokens if GATHER_A else pairs
        a = tl.load(
            a_ptr + a_rows[None, :] * stride_ap + ms[:, None] * stride_am,
            mask=m_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        if SCALE_A:
            scale = tl.load(gate_weight_ptr + pairs, mask=p_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        b_rows = tokens if GATHER_B else pairs
        b_mask = p_mask[:, None] & n_mask[None, :]
        b_ptrs = b_ptr + b_rows[:, None] * stride_bp + ns[None, :] * stride_bn
        if SWIGLU_B:
            gate = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
            up = tl.load(b_ptrs + N * stride_bn, mask=b_mask, other=0.0).to(tl.float32)
            b = (gate * tl.sigmoid(gate) * up).to(b_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION, UPCAST_DOT)

    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Full fp32 products for fp32 inputs, unless torch itself allows TF32 matmuls."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "UPCAST_DOT": _INTERPRET and dtype == torch.bfloat16}


def _pairs_bucket(num_pairs: int) -> int:
    """A coarse pair count for the autotune key, so that routing changes do not retune every step."""
    return min(triton.next_power_of_2(max(num_pairs, 1)), 1 << 16)


def _row_block_grid(num_pairs: int, num_experts: int, num_cols: int):
    """Programs for the grouped kernels: an upper bound on the number of (expert, row block) tiles, times column blocks.

    Each expert's pairs start a new row block, so there are at most `cdiv(P, BLOCK_M) + min(E, P)` row blocks; the
    kernels locate their block on the device and spare programs return at once.
    """

    def grid(meta):
        num_pid_m = triton.cdiv(num_pairs, meta["BLOCK_M"]) + min(num_experts, num_pairs)
        return (num_pid_m * triton.cdiv(num_cols, meta["BLOCK_N"]),)

    return grid


def _block_e(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts))


def _launch_grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    b_strides_ekn: tuple[int, int, int],
    num_cols: int,
    offsets: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 `out[p] = row_scale[p] * a[p] @ b[e]` for expert-sorted pair rows `a (P, K)`, with `b[e]` seen as (K, N)."""
    num_pairs, num_experts = a.shape[0], offsets.shape[0]
    out = torch.empty(num_pairs, num_cols, device=a.device, dtype=torch.float32)
    _grouped_matmul_kernel[_row_block_grid(num_pairs, num_experts, num_cols)](
        a, b, out, offsets, row_scale if row_scale is not None else a,
        num_experts, num_pairs, num_cols, a.shape[1], _pairs_bucket(num_pairs),
        a.stride(0), a.stride(1), *b_strides_ekn, out.stride(0),
        SCALE_ROWS=row_scale is not None, **_dot_options(a.dtype),
        BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
    )  # fmt: skip
    return out


def _launch_token_sum(
    pair_out: torch.Tensor, token_offsets: torch.Tensor, pair_order: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    num_tokens, hidden = token_offsets.shape[0] - 1, pair_out.shape[1]
    out = torch.empty(num_tokens, hidden, device=pair_out.device, dtype=dtype)
    grid = (num_tokens, triton.cdiv(hidden, _TOKEN_SUM_BLOCK_H))
    _token_sum_kernel[grid](
        pair_out, out, token_offsets, pair_order, hidden, pair_out.stride(0), out.stride(0), BLOCK_H=_TOKEN_SUM_BLOCK_H
    )
    return out


def _launch_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    token_idx: torch.Tensor,
    offsets: torch.Tensor,
    gate_weights: torch.Tensor,
    *,
    gather_a: bool,
    scale_a: bool,
    gather_b: bool,
    swiglu_b: bool,
) -> torch.Tensor:
    num_experts, rows, cols = out.shape

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), num_experts)

    _weight_grad_kernel[grid](
        a, b, out, token_idx, offsets, gate_weights,
        num_experts, rows, cols, _pairs_bucket(token_idx.shape[0]),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=gather_a, SCALE_A=scale_a, GATHER_B=gather_b, SWIGLU_B=swiglu_b, **_dot_options(a.dtype),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("remoe::sparse_moe_mlp_forward", mutates_args=())
def _forward_op(
    hidden_states: torch.Tensor,
    gate_weights: torch.Tensor,
    token_idx: torch.Tensor,
    offsets: torch.Tensor,
    token_offsets: torch.Tensor,
    pair_order: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    save_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert MLP over expert-sorted pairs; returns the output and, if `save_gate_up`, the (P, 2I) activations."""
    (num_tokens, hidden), intermediate = hidden_states.shape, down_proj.shape[2]
    num_pairs, num_experts = token_idx.shape[0], offsets.shape[0]
    gate_up = hidden_states.new_empty(num_pairs if save_gate_up else 0, 2 * intermediate)
    if num_pairs == 0:
        return hidden_states.new_zeros(num_tokens, hidden), gate_up

    h = hidden_states.new_empty(num_pairs, intermediate)
    _gate_up_swiglu_kernel[_row_block_grid(num_pairs, num_experts, intermediate)](
        hidden_states, gate_up_proj, token_idx, offsets, gate_up if save_gate_up else h, h,
        num_experts, num_pairs, intermediate, hidden, _pairs_bucket(num_pairs),
        hidden_states.stride(0), hidden_states.stride(1), *gate_up_proj.stride(), gate_up.stride(0), h.stride(0),
        STORE_GATE_UP=save_gate_up, **_dot_options(hidden_states.dtype),
        BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
    )  # fmt: skip
    down_t = (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1))
    pair_out = _launch_grouped_matmul(h, down_proj, down_t, hidden, offsets, row_scale=gate_weights)
    return _launch_token_sum(pair_out, token_offsets, pair_order, hidden_states.dtype), gate_up


@_forward_op.register_fake
def _(
    hidden_states, gate_weights, token_idx, offsets, token_offsets, pair_order, gate_up_proj, down_proj, save_gate_up
):
    num_pairs = token_idx.shape[0] if save_gate_up else 0
    return torch.empty_like(hidden_states), hidden_states.new_empty(num_pairs, gate_up_proj.shape[1])


@torch.library.custom_op("remoe::sparse_moe_mlp_backward", mutates_args=())
def _backward_op(
    grad_output: torch.Tensor,
    hidden_states: torch.Tensor,
    gate_weights: torch.Tensor,
    token_idx: torch.Tensor,
    offsets: torch.Tensor,
    token_offsets: torch.Tensor,
    pair_order: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    needs_hidden_states: bool,
    needs_gate_weights: bool,
    needs_gate_up_proj: bool,
    needs_down_proj: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_forward_op` for hidden_states, gate_weights (P,), gate_up_proj and down_proj.

    A gradient that is not needed comes back as an empty tensor.
    """
    num_pairs, num_experts, intermediate = token_idx.shape[0], offsets.shape[0], down_proj.shape[2]
    if num_pairs == 0:
        return tuple(
            grad.zero_()
            for grad in _empty_grads(
                hidden_states, gate_weights, gate_up_proj, down_proj,
                needs_hidden_states, needs_gate_weights, needs_gate_up_proj, needs_down_proj,
            )
        )  # fmt: skip
    if gate_up.shape[0] != num_pairs:
        raise RuntimeError("sparse_moe_mlp: the forward did not save its activations (it ran without gradients)")
    d_hidden, d_weights, d_gate_up_proj, d_down_proj = _empty_grads(
        hidden_states, gate_weights, gate_up_proj, down_proj,
        needs_hidden_states, needs_gate_weights, needs_gate_up_proj, needs_down_proj,
    )  # fmt: skip
    grad_output = grad_output.to(hidden_states.dtype)

    if needs_hidden_states or needs_gate_weights or needs_gate_up_proj:
        d_gate_up = torch.empty_like(gate_up)
        partial = gate_up.new_zeros(
            triton.cdiv(intermediate, _DOWN_BACKWARD_MIN_BLOCK_N), num_pairs, dtype=torch.float32
        )
        _down_backward_kernel[_row_block_grid(num_pairs, num_experts, intermediate)](
            grad_output, down_proj, token_idx, offsets, gate_weights, gate_up, d_gate_up, partial,
            num_experts, num_pairs, intermediate, down_proj.shape[1], _pairs_bucket(num_pairs),
            grad_output.stride(0), grad_output.stride(1), *down_proj.stride(),
            gate_up.stride(0), d_gate_up.stride(0), partial.stride(0),
            **_dot_options(hidden_states.dtype), BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
        )  # fmt: skip
        if needs_gate_weights:
            d_weights = partial.sum(0).to(gate_weights.dtype)
        if needs_gate_up_proj:
            _launch_weight_grad(
                d_gate_up, hidden_states, d_gate_up_proj, token_idx, offsets, gate_weights,
                gather_a=False, scale_a=False, gather_b=True, swiglu_b=False,
            )  # fmt: skip
        if needs_hidden_states:
            hidden = hidden_states.shape[1]
            pair_grad = _launch_grouped_matmul(d_gate_up, gate_up_proj, gate_up_proj.stride(), hidden, offsets)
            d_hidden = _launch_token_sum(pair_grad, token_offsets, pair_order, hidden_states.dtype)
    if needs_down_proj:
        _launch_weight_grad(
            grad_output, gate_up, d_down_proj, token_idx, offsets, gate_weights,
            gather_a=True, scale_a=True, gather_b=False, swiglu_b=True,
        )  # fmt: skip
    return d_hidden, d_weights, d_gate_up_proj, d_down_proj


def _empty_grads(hidden_states, gate_weights, gate_up_proj, down_proj, *needs: bool) -> list[torch.Tensor]:
    """Uninitialised gradient buffers, or empty (0,) tensors where a gradient is not needed."""
    tensors = (hidden_states, gate_weights, gate_up_proj, down_proj)
    return [t.new_empty(t.shape if need else (0,)) for t, need in zip(tensors, needs, strict=True)]


@_backward_op.register_fake
def _(grad_output, hidden_states, gate_weights, token_idx, offsets, token_offsets, pair_order, gate_up_proj, down_proj,
      gate_up, *needs):  # fmt: skip
    return tuple(_empty_grads(hidden_states, gate_weights, gate_up_proj, down_proj, *needs))


def _setup_context(ctx, inputs, output) -> None:
    hidden_states, gate_weights, token_idx, offsets, token_offsets, pair_order, gate_up_proj, down_proj, _ = inputs
    ctx.save_for_backward(
        hidden_states, gate_weights, token_idx, offsets, token_offsets, pair_order, gate_up_proj, down_proj, output[1]
    )
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_output: torch.Tensor, _grad_gate_up: torch.Tensor | None):
    needs_hidden, needs_weights, *_, needs_gate_up_proj, needs_down_proj, _ = ctx.needs_input_grad
    d_hidden, d_weights, d_gate_up_proj, d_down_proj = _backward_op(
        grad_output, *ctx.saved_tensors, needs_hidden, needs_weights, needs_gate_up_proj, needs_down_proj
    )
    return (
        d_hidden if needs_hidden else None,
        d_weights if needs_weights else None,
        None,
        None,
        None,
        None,
        d_gate_up_proj if needs_gate_up_proj else None,
        d_down_proj if needs_down_proj else None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class TokenOrder(NamedTuple):
    """The expert-sorted pairs listed token by token."""

    token_offsets: torch.Tensor  # (T + 1,) int64: token t owns pair_order[token_offsets[t]:token_offsets[t + 1]]
    pair_order: torch.Tensor  # (P,) int64 positions in the expert-sorted pair list


def build_token_order(token_idx: torch.Tensor, num_tokens: int) -> TokenOrder:
    """Group the expert-sorted pairs by token, on the device and without host synchronisation."""
    pair_order = torch.argsort(token_idx, stable=True)
    boundaries = torch.arange(num_tokens + 1, device=token_idx.device, dtype=token_idx.dtype)
    return TokenOrder(torch.searchsorted(token_idx[pair_order], boundaries), pair_order)


def triton_sparse_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Sparse expert MLP with the Triton kernels (CUDA tensors, or CPU tensors with `TRITON_INTERPRET=1`)."""
    if not hidden_states.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise ValueError(
            "the triton implementation needs hidden_states, gate_up_proj and down_proj in one dtype; got "
            f"{hidden_states.dtype}, {gate_up_proj.dtype} and {down_proj.dtype}"
        )
    plan = build_dispatch_plan(gates)
    order = build_token_order(plan.token_idx, hidden_states.shape[0])
    save_gate_up = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, gates, gate_up_proj, down_proj)
    )
    output, _ = _forward_op(
        hidden_states, plan.weights, plan.token_idx, plan.offsets, order.token_offsets, order.pair_order,
        gate_up_proj, down_proj, save_gate_up,
    )  # fmt: skip
    return output
