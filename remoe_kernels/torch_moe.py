"""Torch implementations of the dropless, variable-k sparse expert MLP."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DispatchPlan(NamedTuple):
    """(token, expert) pairs with a nonzero gate, sorted by expert."""

    token_idx: torch.Tensor  # (P,) int64
    expert_idx: torch.Tensor  # (P,) int64
    weights: torch.Tensor  # (P,) gate values, differentiable with respect to `gates`
    offsets: torch.Tensor  # (E,) int32, cumulative pair count per expert (end offsets)


def build_dispatch_plan(gates: torch.Tensor) -> DispatchPlan:
    """Sort the nonzero entries of `gates (T, E)` by expert.

    Scanning the transposed gates in row-major order yields pairs already grouped by expert, so no sort is needed.
    The only host synchronisation is the one `nonzero` needs for the pair count.
    """
    active = gates.detach() != 0
    expert_idx, token_idx = active.t().nonzero(as_tuple=True)
    offsets = active.sum(0).cumsum(0).to(torch.int32)  # no bincount: on CUDA it synchronises to find its length
    return DispatchPlan(token_idx, expert_idx, gates[token_idx, expert_idx], offsets)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` as `F.linear` would compute with them: where autocast is on for their device, the floating ones other
    than float64 cast to the autocast dtype (for kernels that have no autocast rule of their own)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_supported(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands.

    It needs 16-byte aligned weights whose rows are contiguous and 16-byte aligned row strides (H and I multiples of
    16 / element size); on CUDA, its fast kernel needs bf16 on Hopper or Blackwell (anything else falls back to a
    host-synchronising loop in torch).
    """
    if not hasattr(F, "grouped_mm") or not hidden_states.dtype == gate_up_proj.dtype == down_proj.dtype:
        return False
    if hidden_states.device.type == "cuda" and (
        hidden_states.dtype != torch.bfloat16
        or torch.cuda.get_device_capability(hidden_states.device)[0] not in (9, 10)
    ):
        return False
    alignment = 16 // hidden_states.element_size()
    hidden, intermediate = down_proj.shape[1], down_proj.shape[2]
    return (
        hidden % alignment == 0
        and all(
            w.stride(2) == 1
            and w.stride(0) % alignment == 0
            and w.stride(1) % alignment == 0
            and w.data_ptr() % 16 == 0
            for w in (gate_up_proj, down_proj)
        )
        and intermediate % alignment == 0
    )


def grouped_mm_sparse_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Sparse expert MLP with `torch.nn.functional.grouped_mm` over the expert-sorted pairs.

    `grouped_mm` has no autocast rule: under autocast its operands are cast here as `F.linear` would cast them, and the
    output keeps the dtype of `hidden_states`. Where `grouped_mm_supported` says no, this runs the looped path, which
    gives the same result.
    """
    output_dtype = hidden_states.dtype
    operands = autocast_operands(hidden_states, gate_up_proj, down_proj)
    if not grouped_mm_supported(*operands):
        return looped_sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj)
    hidden_states, gate_up_proj, down_proj = operands
    plan = build_dispatch_plan(gates)
    rows = hidden_states[plan.token_idx]
    gate_up = F.grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=plan.offsets)
    activation = _swiglu(gate_up)
    weights = plan.weights.to(activation.dtype)[:, None]
    if down_proj.shape[-1] < down_proj.shape[-2]:  # the gate on the smaller tensor: (P, I) here, not (P, H)
        weighted = F.grouped_mm((activation * weights).contiguous(), down_proj.transpose(1, 2), offs=plan.offsets)
    else:
        weighted = F.grouped_mm(activation.contiguous(), down_proj.transpose(1, 2), offs=plan.offsets) * weights
    output = hidden_states.new_zeros(hidden_states.shape, dtype=output_dtype)
    return output.index_add_(0, plan.token_idx, weighted.to(output_dtype))


class ExpertsLinear(torch.autograd.Function):
    """`rows (P, in)` grouped by expert (`counts[e]` rows for expert e, in order) times `weight (E, out, in)`:
    `(P, out)`, one matmul per expert with rows and none for the others. Backward writes every expert's weight
    gradient into one `(E, out, in)` buffer: no buffer of its own per expert, no stacking afterwards, and only the
    experts without rows are zero-filled. (The model file has the same class: it is also Hub remote code and cannot
    import this package.)"""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        output = rows.new_empty(rows.shape[0], weight.shape[1])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                torch.mm(rows[start : start + count], weight[expert].t(), out=output[start : start + count])
                start += count
        ctx.save_for_backward(rows, weight)
        ctx.counts = counts
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        rows, weight = ctx.saved_tensors
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for expert, count in enumerate(ctx.counts):
            if count:
                grad = grad_output[start : start + count]
                if grad_rows is not None:
                    torch.mm(grad, weight[expert], out=grad_rows[start : start + count])
                if grad_weight is not None:
                    torch.mm(grad.t(), rows[start : start + count], out=grad_weight[expert])
                start += count
            elif grad_weight is not None:  # only the experts without rows are zeroed, not the whole buffer first
                grad_weight[expert].zero_()
        if grad_weight is not None and len(ctx.counts) < len(grad_weight):
            grad_weight[len(ctx.counts) :].zero_()
        return grad_rows, grad_weight, None


def looped_sparse_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Sparse expert MLP as a loop over the experts that received tokens (the reference path).

    The pairs are gathered once, in expert order; `ExpertsLinear` runs one matmul per expert with tokens (none for
    the others) and fills one weight-gradient buffer in backward instead of one per expert. The gate multiplies the
    smaller of the `(P, I)` activation and the `(P, H)` output."""
    output_dtype = hidden_states.dtype
    plan = build_dispatch_plan(gates)
    output = torch.zeros_like(hidden_states)
    if plan.token_idx.numel() == 0:
        return output
    counts = torch.diff(plan.offsets, prepend=plan.offsets.new_zeros(1)).tolist()
    rows, gate_up_proj, down_proj = autocast_operands(hidden_states[plan.token_idx], gate_up_proj, down_proj)
    rows = rows.to(gate_up_proj.dtype)
    activation = _swiglu(ExpertsLinear.apply(rows, gate_up_proj, counts))
    weights = plan.weights.to(activation.dtype)[:, None]
    if down_proj.shape[-1] < down_proj.shape[-2]:  # the gate on the smaller tensor: (P, I) here, not (P, H)
        weighted = ExpertsLinear.apply(activation * weights, down_proj, counts)
    else:
        weighted = ExpertsLinear.apply(activation, down_proj, counts) * weights
    return output.index_add_(0, plan.token_idx, weighted.to(output_dtype))


def batched_mm_sparse_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Sparse expert MLP as one batched matmul per projection over the pairs' own copies of their expert weights
    (memory grows with the pair count: meant for decoding a few tokens, like Transformers' `batched_mm`)."""
    plan = build_dispatch_plan(gates)
    rows = hidden_states[plan.token_idx]
    gate_up = torch.bmm(gate_up_proj[plan.expert_idx], rows.unsqueeze(-1)).squeeze(-1)
    activation, weights = _swiglu(gate_up), plan.weights.to(gate_up.dtype)[:, None]
    if down_proj.shape[-1] < down_proj.shape[-2]:  # the gate on the smaller tensor: (P, I) here, not (P, H)
        weighted = torch.bmm(down_proj[plan.expert_idx], (activation * weights).unsqueeze(-1)).squeeze(-1)
    else:
        weighted = torch.bmm(down_proj[plan.expert_idx], activation.unsqueeze(-1)).squeeze(-1) * weights
    return torch.zeros_like(hidden_states).index_add_(0, plan.token_idx, weighted.to(hidden_states.dtype))


def dense_reference_moe_mlp(
    hidden_states: torch.Tensor, gates: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, weighted by the gates: the einsum oracle for tests (O(T*E*H) memory)."""
    gate_up = torch.einsum("th,eih->tei", hidden_states, gate_up_proj)
    expert_out = torch.einsum("tei,ehi->teh", _swiglu(gate_up), down_proj)
    return torch.einsum("te,teh->th", gates.to(expert_out.dtype), expert_out)
