"""Triton kernels for the dropless, variable-k sparse expert MLP (forward and backward).

The (token, expert) pairs with a nonzero gate are sorted by expert (`build_dispatch_plan`; for Transformers' fixed-k
experts contract `triton_top_k_moe_mlp` sorts the routes, with no host synchronisation). Every kernel works on that list
directly: grouped GEMMs gather token rows by index, each program finds its expert and row block from the expert
end-offsets on the device, and results are summed per token in a fixed order (no atomics, so forward and backward are
bitwise reproducible for a given kernel config). Nothing is padded and no token is dropped.

Forward (P pairs, T tokens, tensors in the compute dtype unless noted):
    `_gate_up_swiglu_kernel`   x[token] @ W_gate_up[e].T  -> gate_up (P, 2I, saved for backward), h = silu(gate) * up (P, I)
    `_grouped_matmul_kernel`   gate[p] * h @ W_down[e].T, from the fp32 accumulator straight into the output row of a
                               token with one pair, else into a per-pair buffer (P, H)
    `_token_sum_kernel`        fp32 sum of the per-pair rows of every token with several pairs (zeros for none)
Backward:
    `_down_backward_kernel`    dy[token] @ W_down[e] -> d_gate_up (P, 2I) through the SiLU-gated product, h (P, I) for
                               the down-projection weight gradient, and partial sums of the gate gradient
                               <dy[token], W_down[e] h>
    `_weight_grad_kernel`      per expert, sum over its pairs: d W_down[e] = (gate * dy[token]).T @ h and
                               d W_gate_up[e] = d_gate_up.T @ x[token]
    `_grouped_matmul_kernel` + `_token_sum_kernel`  d x = sum over a token's pairs of d_gate_up @ W_gate_up[e]

All products accumulate in fp32. Under autocast the operands are cast as `F.linear` would cast them (the custom ops
have no autocast rule of their own) and the output keeps the input's dtype, its token sums kept in fp32.

Kernel configs are autotuned per (N, K, dtypes, pair-count bucket), with `_benchmark` (no 256 MB cache-flush buffer) and
only configs that fit the device's shared memory. The config changes the accumulation order, hence the low bits of the
result; for results that are bitwise the same across processes, `REMOE_TRITON_DETERMINISTIC=1` (or
`torch.use_deterministic_algorithms(True)`) replaces autotuning by one fixed config per kernel and dtype
(`FIXED_TILES`). The forward and backward are `torch.library.custom_op`s with a registered autograd formula and fake
implementations, so they also run under `torch.compile`; every launch runs under a guard for its tensors' CUDA device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .torch_moe import autocast_operands, build_dispatch_plan

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DETERMINISTIC_ENV = "REMOE_TRITON_DETERMINISTIC"


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.5's interpreter turns a scalar into a Python int (a `range` bound) with `int()` of a (1,)-shaped array,
    which NumPy 2.4 refuses; later Triton squeezes the array first, and so does this patch of the older ones."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or "int(self.handle.data)" not in inspect.getsource(patch_tensor):
        return

    def patch_tensor_with_squeeze(tensor) -> None:
        patch_tensor(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch_tensor_with_squeeze


if _INTERPRET:
    _patch_interpreter_loop_bounds()


class Tiles(NamedTuple):
    """One kernel config: block sizes, warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Fits the ~100 KB of shared memory of consumer GPUs (sm86/sm89) even in fp32.
_SMALL_TILES = Tiles(64, 64, 32, 4, 3)
# BLOCK_N at most 128: the gate-up kernel holds two fp32 accumulators (gate and up) per program, the down-projection
# backward its product and the gate and up activations.
_NARROW_TILES = (
    Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 32, 8, 4), Tiles(128, 64, 64, 4, 4), Tiles(64, 128, 64, 4, 4),
    Tiles(64, 64, 64, 4, 4), _SMALL_TILES,
)  # fmt: skip
# Autotune candidates, tuned on Hopper; configs that do not fit the device's shared memory are pruned at tuning time.
GPU_TILES: dict[str, tuple[Tiles, ...]] = {
    "gate_up": _NARROW_TILES,
    "matmul": (
        Tiles(128, 128, 64, 8, 3), Tiles(128, 256, 64, 8, 3), Tiles(128, 128, 32, 8, 4), Tiles(64, 128, 64, 4, 4),
        Tiles(64, 64, 64, 4, 4), _SMALL_TILES,
    ),
    "down_backward": _NARROW_TILES,
    "weight_grad": (
        Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 32, 8, 4), Tiles(128, 64, 64, 4, 4), Tiles(64, 128, 64, 4, 4),
        Tiles(64, 64, 128, 4, 3), _SMALL_TILES,
    ),
}  # fmt: skip
# The deterministic configs, one per kernel and operand element size (2: bf16/fp16, 4: fp32), each within 99 KB.
FIXED_TILES: dict[tuple[str, int], Tiles] = {
    ("gate_up", 2): Tiles(128, 128, 32, 8, 4),
    ("matmul", 2): Tiles(128, 128, 64, 8, 3),
    ("down_backward", 2): Tiles(128, 128, 64, 8, 3),
    ("weight_grad", 2): Tiles(128, 128, 32, 8, 4),
    **{(name, 4): _SMALL_TILES for name in GPU_TILES},
}
_INTERPRETER_TILES = Tiles(16, 16, 16, 1, 1)
# The gate-gradient partial sums get one row per column block of `_down_backward_kernel`: size for the smallest.
_DOWN_BACKWARD_MIN_BLOCK_N = (
    _INTERPRETER_TILES.block_n
    if _INTERPRET
    else min(t.block_n for t in (*GPU_TILES["down_backward"], *(FIXED_TILES[("down_backward", s)] for s in (2, 4))))
)
_TOKEN_SUM_BLOCK_H = 16 if _INTERPRET else 1024
_GROUP_M = 2 if _INTERPRET else 8
_AUTOTUNE_KEY = ["N", "K", "pairs_bucket"]
# Upper edges of the pair-count buckets of the autotune key (the last one: everything larger). Each sits at 1.5 times a
# power of two, so that the steady pair count T*k of a power-of-two token count T stays inside one bucket.
PAIR_BUCKET_EDGES = (1536, 12288, 2**31 - 16)
_BENCHMARK_RUNS = 10


def shared_memory_bytes(tiles: Tiles, element_size: int, b_tiles: int = 1) -> int:
    """Estimated shared memory of one program: `num_stages` buffers of its A tile and of `b_tiles` B tiles."""
    return tiles.num_stages * (tiles.block_m * tiles.block_k + b_tiles * tiles.block_k * tiles.block_n) * element_size


def b_tiles(kernel: str, swiglu_b: bool = False) -> int:
    """B tiles per pipeline stage: the gate-up kernel loads gate and up weights, `_weight_grad_kernel` with SWIGLU_B
    the gate and up activations."""
    return 2 if kernel == "gate_up" or (kernel == "weight_grad" and swiglu_b) else 1


def fixed_configs_enabled() -> bool:
    """Whether the kernels run with `FIXED_TILES` instead of autotuned configs."""
    return os.environ.get(DETERMINISTIC_ENV, "0") == "1" or torch.are_deterministic_algorithms_enabled()


def fixed_tiles(kernel: str, element_size: int) -> Tiles:
    return _INTERPRETER_TILES if _INTERPRET else FIXED_TILES[(kernel, 4 if element_size >= 4 else 2)]


def _config(tiles: Tiles) -> triton.Config:
    blocks = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k}
    return triton.Config(blocks, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _tiles_of(config: triton.Config) -> Tiles:
    blocks = config.kwargs
    return Tiles(blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], config.num_warps, config.num_stages)


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _prune_to_shared_memory(kernel: str, configs: list[triton.Config], named_args: dict, **kwargs) -> list:
    """The configs that fit the device's shared memory, or the smallest one if none does."""
    first_operand = next(iter(named_args.values()))
    limit = _max_shared_memory(first_operand.device.index)
    size = {
        config: shared_memory_bytes(
            _tiles_of(config), first_operand.element_size(), b_tiles(kernel, kwargs.get("SWIGLU_B", False))
        )
        for config in configs
    }
    return [config for config in configs if size[config] <= limit] or [min(configs, key=size.get)]


def _benchmark(kernel_call: Callable[[], None], quantiles: tuple[float, ...]) -> list[float]:
    """Autotuning timer: quantiles of a few CUDA-event timed runs after one warm-up, without `triton.testing.do_bench`'s
    256 MB cache-flush buffer and its 100 ms of runs per config (a retune may happen in the middle of training)."""
    kernel_call()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(_BENCHMARK_RUNS)
    ]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return [times[min(int(q * len(times)), len(times) - 1)] for q in quantiles]


class _Kernel:
    """A jitted kernel, launched with its autotuned config, or with its fixed config when `fixed_configs_enabled()`."""

    def __init__(self, fn, name: str, key: list[str], **autotune_options) -> None:
        self.fn, self.name = fn, name
        tiles = (_INTERPRETER_TILES,) if _INTERPRET else GPU_TILES[name]
        self.autotuned = triton.autotune(
            configs=[_config(t) for t in tiles],
            key=key,
            prune_configs_by={"early_config_prune": functools.partial(_prune_to_shared_memory, name)},
            do_bench=_benchmark,
            **autotune_options,
        )(fn)

    def __getitem__(self, grid) -> Callable[..., None]:
        """A launcher on `grid`; the config of a fixed launch follows the element size of the first operand."""

        def launch(*args, **kwargs) -> None:
            if fixed_configs_enabled():
                config = _config(fixed_tiles(self.name, args[0].element_size()))
                self.fn[grid](*args, **kwargs, **config.all_kwargs())
            else:
                self.autotuned[grid](*args, **kwargs)

        return launch


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


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    pair_out_ptr,
    offsets_ptr,
    token_idx_ptr,
    token_offsets_ptr,
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
    stride_ot,
    stride_pp,
    SCALE_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`row_scale[p] * a[p] @ b[e]` for the pairs p of expert e, with `b[e]` of shape (K, N), stored into
    `out[token[p]]` when p is the only pair of its token and into `pair_out[p]` otherwise."""
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
    tokens = tl.load(token_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    first = tl.load(token_offsets_ptr + tokens, mask=row_mask, other=0)
    token_pairs = tl.load(token_offsets_ptr + tokens + 1, mask=row_mask, other=0) - first
    mask = row_mask[:, None] & col_mask[None, :]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask & (token_pairs == 1)[:, None])
    pair_out_ptrs = pair_out_ptr + rows[:, None] * stride_pp + cols[None, :]
    tl.store(pair_out_ptrs, acc.to(pair_out_ptr.dtype.element_ty), mask=mask & (token_pairs != 1)[:, None])


@triton.jit
def _token_sum_kernel(
    pair_out_ptr, out_ptr, token_offsets_ptr, pair_order_ptr, H, stride_pp, stride_ot, BLOCK_H: tl.constexpr
):
    """`out[t] = fp32 sum of pair_out[p]` over the pairs of token t in a fixed order, for tokens without pairs (zero)
    or with several; `_grouped_matmul_kernel` has written the rows of tokens with one pair."""
    token = tl.program_id(0)
    first = tl.load(token_offsets_ptr + token)
    last = tl.load(token_offsets_ptr + token + 1)
    if last - first == 1:
        return
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(first, last):
        pair = tl.load(pair_order_ptr + i).to(tl.int64)
        acc += tl.load(pair_out_ptr + pair * stride_pp + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _down_backward_kernel(
    dy_ptr,
    w_ptr,
    token_idx_ptr,
    offsets_ptr,
    gate_weight_ptr,
    gate_up_ptr,
    d_gate_up_ptr,
    h_ptr,
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
    stride_hp,
    stride_partial,
    STORE_H: tl.constexpr,
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
    this column block's share of the gate gradient `<dh, h[p]>` goes to `d_gate_partial[pid_n, p]`, and with STORE_H
    `h[p] = silu(gate_pre) * up` (the forward's h, for the down-projection weight gradient).
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
    h = silu * up
    partial_ptrs = d_gate_partial_ptr + pid_n.to(tl.int64) * stride_partial + rows
    tl.store(partial_ptrs, tl.sum(dh * h, axis=1), mask=row_mask)
    if STORE_H:
        tl.store(h_ptr + rows[:, None] * stride_hp + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)

    dh *= tl.load(gate_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    d_gate = dh * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    d_up = dh * silu
    d_gate_ptrs = d_gate_up_ptr + rows[:, None] * stride_dgp + cols[None, :]
    tl.store(d_gate_ptrs, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gate_ptrs + N, d_up.to(d_gate_up_ptr.dtype.element_ty), mask=mask)


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


_GATE_UP = _Kernel(_gate_up_swiglu_kernel, "gate_up", _AUTOTUNE_KEY)
_MATMUL = _Kernel(_grouped_matmul_kernel, "matmul", _AUTOTUNE_KEY)
# Configs differ in BLOCK_N, hence in which partial-sum rows they write: zero the buffer around the benchmarking.
_DOWN_BACKWARD = _Kernel(_down_backward_kernel, "down_backward", _AUTOTUNE_KEY, reset_to_zero=["d_gate_partial_ptr"])
_WEIGHT_GRAD = _Kernel(_weight_grad_kernel, "weight_grad", ["M", "N", "pairs_bucket", "SWIGLU_B"])


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Full fp32 products for fp32 inputs, unless torch itself allows TF32 matmuls."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "UPCAST_DOT": _INTERPRET and dtype == torch.bfloat16}


def _pairs_bucket(num_pairs: int) -> int:
    """The pair-count bucket of the autotune key (its upper edge), so that routing changes rarely retune: a run tunes
    each kernel at most `len(PAIR_BUCKET_EDGES)` times per shape and dtype."""
    return next((edge for edge in PAIR_BUCKET_EDGES if num_pairs <= edge), PAIR_BUCKET_EDGES[-1])


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


def _device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """`tensor`'s CUDA device as the current one: Triton launches on the current device and its current stream."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _grouped_matmul_summed(
    a: torch.Tensor,
    b: torch.Tensor,
    b_strides_ekn: tuple[int, int, int],
    num_cols: int,
    offsets: torch.Tensor,
    token_idx: torch.Tensor,
    order: TokenOrder,
    out_dtype: torch.dtype,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out[t] = sum over the pairs p of token t of row_scale[p] * a[p] @ b[e]`, (T, N) in `out_dtype`, for the
    expert-sorted pair rows `a (P, K)` and `b[e]` seen as (K, N). Rows of several pairs go through a per-pair buffer in
    `a`'s dtype and are summed in fp32."""
    num_pairs, num_experts, num_tokens = a.shape[0], offsets.shape[0], order.token_offsets.shape[0] - 1
    out = torch.empty(num_tokens, num_cols, device=a.device, dtype=out_dtype)
    pair_out = torch.empty(num_pairs, num_cols, device=a.device, dtype=a.dtype)
    _MATMUL[_row_block_grid(num_pairs, num_experts, num_cols)](
        a, b, out, pair_out, offsets, token_idx, order.token_offsets, row_scale if row_scale is not None else a,
        num_experts, num_pairs, num_cols, a.shape[1], _pairs_bucket(num_pairs),
        a.stride(0), a.stride(1), *b_strides_ekn, out.stride(0), pair_out.stride(0),
        SCALE_ROWS=row_scale is not None, **_dot_options(a.dtype), BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
    )  # fmt: skip
    _token_sum_kernel[(num_tokens, triton.cdiv(num_cols, _TOKEN_SUM_BLOCK_H))](
        pair_out, out, order.token_offsets, order.pair_order, num_cols, pair_out.stride(0), out.stride(0),
        BLOCK_H=_TOKEN_SUM_BLOCK_H,
    )  # fmt: skip
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

    _WEIGHT_GRAD[grid](
        a, b, out, token_idx, offsets, gate_weights,
        num_experts, rows, cols, _pairs_bucket(token_idx.shape[0]),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=gather_a, SCALE_A=scale_a, GATHER_B=gather_b, SWIGLU_B=swiglu_b, **_dot_options(a.dtype),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------------------------


class TokenOrder(NamedTuple):
    """The expert-sorted pairs listed token by token."""

    token_offsets: torch.Tensor  # (T + 1,) int64: token t owns pair_order[token_offsets[t]:token_offsets[t + 1]]
    pair_order: torch.Tensor  # (P,) int64 positions in the expert-sorted pair list


def build_token_order(token_idx: torch.Tensor, num_tokens: int) -> TokenOrder:
    """Group the expert-sorted pairs by token, on the device and without host synchronisation.

    A pair whose `token_idx` is `num_tokens` or more belongs to no token: it is listed after every token's pairs.
    """
    pair_order = torch.argsort(token_idx, stable=True)
    boundaries = torch.arange(num_tokens + 1, device=token_idx.device, dtype=token_idx.dtype)
    return TokenOrder(torch.searchsorted(token_idx[pair_order], boundaries), pair_order)


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
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert MLP over expert-sorted pairs; returns the output (T, H), contiguous, in `output_dtype` (default:
    that of `hidden_states`) and, if `save_gate_up`, the (P, 2I) activations."""
    (num_tokens, hidden), intermediate = hidden_states.shape, down_proj.shape[2]
    num_pairs, num_experts = token_idx.shape[0], offsets.shape[0]
    output_dtype = output_dtype or hidden_states.dtype
    gate_up = hidden_states.new_empty(num_pairs if save_gate_up else 0, 2 * intermediate)
    if num_pairs == 0:
        return hidden_states.new_zeros(num_tokens, hidden, dtype=output_dtype), gate_up

    with _device_guard(hidden_states):
        h = hidden_states.new_empty(num_pairs, intermediate)
        _GATE_UP[_row_block_grid(num_pairs, num_experts, intermediate)](
            hidden_states, gate_up_proj, token_idx, offsets, gate_up if save_gate_up else h, h,
            num_experts, num_pairs, intermediate, hidden, _pairs_bucket(num_pairs),
            hidden_states.stride(0), hidden_states.stride(1), *gate_up_proj.stride(), gate_up.stride(0), h.stride(0),
            STORE_GATE_UP=save_gate_up, **_dot_options(hidden_states.dtype),
            BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
        )  # fmt: skip
        down_t = (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1))
        order = TokenOrder(token_offsets, pair_order)
        output = _grouped_matmul_summed(
            h, down_proj, down_t, hidden, offsets, token_idx, order, output_dtype, row_scale=gate_weights
        )
    return output, gate_up


@_forward_op.register_fake
def _(
    hidden_states, gate_weights, token_idx, offsets, token_offsets, pair_order, gate_up_proj, down_proj, save_gate_up,
    output_dtype=None,
):  # fmt: skip
    num_pairs = token_idx.shape[0] if save_gate_up else 0
    output = hidden_states.new_empty(hidden_states.shape, dtype=output_dtype or hidden_states.dtype)
    return output, hidden_states.new_empty(num_pairs, gate_up_proj.shape[1])


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
    needs = (needs_hidden_states, needs_gate_weights, needs_gate_up_proj, needs_down_proj)
    if num_pairs == 0:
        return tuple(
            grad.zero_() for grad in _empty_grads(hidden_states, gate_weights, gate_up_proj, down_proj, *needs)
        )
    if gate_up.shape[0] != num_pairs:
        raise RuntimeError("sparse_moe_mlp: the forward did not save its activations (it ran without gradients)")
    d_hidden, d_weights, d_gate_up_proj, d_down_proj = _empty_grads(
        hidden_states, gate_weights, gate_up_proj, down_proj, *needs
    )
    with _device_guard(hidden_states):
        grad_output = grad_output.to(hidden_states.dtype)
        if needs_hidden_states or needs_gate_weights or needs_gate_up_proj:
            d_gate_up = torch.empty_like(gate_up)
            h = gate_up.new_empty(num_pairs if needs_down_proj else 0, intermediate)
            partial = gate_up.new_zeros(
                triton.cdiv(intermediate, _DOWN_BACKWARD_MIN_BLOCK_N), num_pairs, dtype=torch.float32
            )
            _DOWN_BACKWARD[_row_block_grid(num_pairs, num_experts, intermediate)](
                grad_output, down_proj, token_idx, offsets, gate_weights, gate_up, d_gate_up,
                h if needs_down_proj else d_gate_up, partial,
                num_experts, num_pairs, intermediate, down_proj.shape[1], _pairs_bucket(num_pairs),
                grad_output.stride(0), grad_output.stride(1), *down_proj.stride(),
                gate_up.stride(0), d_gate_up.stride(0), h.stride(0), partial.stride(0),
                STORE_H=needs_down_proj, **_dot_options(hidden_states.dtype),
                BLOCK_E=_block_e(num_experts), GROUP_M=_GROUP_M,
            )  # fmt: skip
            if needs_down_proj:
                _launch_weight_grad(
                    grad_output, h, d_down_proj, token_idx, offsets, gate_weights,
                    gather_a=True, scale_a=True, gather_b=False, swiglu_b=False,
                )  # fmt: skip
                del h
            if needs_gate_weights:
                d_weights = partial.sum(0).to(gate_weights.dtype)
            if needs_gate_up_proj:
                _launch_weight_grad(
                    d_gate_up, hidden_states, d_gate_up_proj, token_idx, offsets, gate_weights,
                    gather_a=False, scale_a=False, gather_b=True, swiglu_b=False,
                )  # fmt: skip
            if needs_hidden_states:
                order = TokenOrder(token_offsets, pair_order)
                d_hidden = _grouped_matmul_summed(
                    d_gate_up, gate_up_proj, gate_up_proj.stride(), hidden_states.shape[1], offsets, token_idx,
                    order, hidden_states.dtype,
                )  # fmt: skip
        elif needs_down_proj:  # only the down projection trains: h from gate_up inside the weight-gradient kernel
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
    ctx.save_for_backward(*inputs[:8], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_output: torch.Tensor, _grad_gate_up: torch.Tensor | None):
    needs = ctx.needs_input_grad
    needs_hidden, needs_weights, needs_gate_up_proj, needs_down_proj = needs[0], needs[1], needs[6], needs[7]
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
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _compute_operands(
    hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands in the dtype the kernels compute in: autocast's where it is on, else their own common dtype."""
    hidden_states, gate_up_proj, down_proj = autocast_operands(hidden_states, gate_up_proj, down_proj)
    if not hidden_states.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise ValueError(
            "the triton implementation needs hidden_states, gate_up_proj and down_proj in one dtype; got "
            f"{hidden_states.dtype}, {gate_up_proj.dtype} and {down_proj.dtype}"
        )
    return hidden_states, gate_up_proj, down_proj


def _run(
    compute: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    output_dtype: torch.dtype,
    save_gate_up: bool,
    token_idx: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor,
    order: TokenOrder,
) -> torch.Tensor:
    """The forward operator on the compute operands `(hidden_states, gate_up_proj, down_proj)` and the pairs."""
    hidden_states, gate_up_proj, down_proj = compute
    output, _ = _forward_op(
        hidden_states, weights, token_idx, offsets, order.token_offsets, order.pair_order, gate_up_proj, down_proj,
        save_gate_up, output_dtype,
    )  # fmt: skip
    return output


def _saves_activations(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def triton_sparse_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Sparse expert MLP with the Triton kernels (CUDA tensors, or CPU tensors with `TRITON_INTERPRET=1`)."""
    compute = _compute_operands(hidden_states, gate_up_proj, down_proj)
    plan = build_dispatch_plan(gates)
    order = build_token_order(plan.token_idx, hidden_states.shape[0])
    save_gate_up = _saves_activations(hidden_states, gates, gate_up_proj, down_proj)
    return _run(compute, hidden_states.dtype, save_gate_up, plan.token_idx, plan.weights, plan.offsets, order)


def triton_top_k_moe_mlp(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """`(R, H)`: row r gets `sum_j top_k_weights[r, j] * FFN_{top_k_index[r, j]}(hidden_states[r])`, with the Triton
    kernels; an index of E or more (expert parallelism's sentinel) contributes nothing.

    The pair count is R*K, known without looking at the routes: unlike `triton_sparse_moe_mlp`, nothing synchronises
    with the host.
    """
    compute = _compute_operands(hidden_states, gate_up_proj, down_proj)
    num_rows, num_experts = top_k_index.shape[0], gate_up_proj.shape[0]
    experts, pairs = torch.sort(top_k_index.reshape(-1), stable=True)
    token_idx = pairs // top_k_index.shape[1]
    boundaries = torch.arange(1, num_experts + 1, device=experts.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, boundaries, out_int32=True)
    order = build_token_order(torch.where(experts < num_experts, token_idx, num_rows), num_rows)
    save_gate_up = _saves_activations(hidden_states, top_k_weights, gate_up_proj, down_proj)
    weights = top_k_weights.reshape(-1)[pairs]
    return _run(compute, hidden_states.dtype, save_gate_up, token_idx, weights, offsets, order)
