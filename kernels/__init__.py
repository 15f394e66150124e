"""Sparse expert kernels for variable experts per token (ReLU routing), with torch fallbacks.

`sparse_moe_mlp` runs one of `IMPLEMENTATIONS`: "eager" (a loop over the experts that received tokens),
"batched_mm" (one batched matmul over the pairs' gathered expert weights), "grouped_mm"
(`torch.nn.functional.grouped_mm` over the expert-sorted pairs) and, when Triton is installed, "triton" (the kernels
of `remoe.kernels.triton_moe`, for CUDA tensors or for CPU tensors under `TRITON_INTERPRET=1`). Triton is imported on
first use only: the interpreter must be switched on before `import triton`.

`triton_experts_forward` is the same kernels behind Transformers' experts contract
`(module, hidden_states, top_k_index, top_k_weights)`, which the ReMoE model registers as `experts_implementation="triton"`.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .torch_moe import (
    DispatchPlan,
    batched_mm_sparse_moe_mlp,
    build_dispatch_plan,
    dense_reference_moe_mlp,
    grouped_mm_sparse_moe_mlp,
    looped_sparse_moe_mlp,
)

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm", *(("triton",) if _TRITON_INSTALLED else ()))


def _triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj) -> torch.Tensor:
    if hidden_states.device.type != "cuda" and not _triton_interpreter_enabled():
        raise ValueError(
            f"implementation='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run on "
            f"{hidden_states.device.type}; got {hidden_states.device.type} tensors (use 'eager' or 'grouped_mm')"
        )
    from .triton_moe import triton_sparse_moe_mlp

    return triton_sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj)


_FUNCTIONS = {
    "eager": looped_sparse_moe_mlp,
    "batched_mm": batched_mm_sparse_moe_mlp,
    "grouped_mm": grouped_mm_sparse_moe_mlp,
}
if _TRITON_INSTALLED:
    _FUNCTIONS["triton"] = _triton_sparse_moe_mlp


def default_implementation(device: torch.device | str) -> str:
    """The default for `device`: "grouped_mm" where torch has it (Triton stays opt-in until it is measured ahead)."""
    return "grouped_mm" if hasattr(F, "grouped_mm") else "eager"


def triton_experts_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The Triton kernels behind Transformers' experts contract: rows (R, H) routed to `top_k_index (R, K)` with
    `top_k_weights (R, K)`; `module` holds `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`."""
    gates = hidden_states.new_zeros(hidden_states.shape[0], module.gate_up_proj.shape[0], dtype=top_k_weights.dtype)
    gates = gates.scatter(1, top_k_index, top_k_weights)
    return sparse_moe_mlp(hidden_states, gates, module.gate_up_proj, module.down_proj, implementation="triton")


def _check_shapes(hidden_states, gates, gate_up_proj, down_proj) -> None:
    if hidden_states.dim() != 2 or gates.dim() != 2 or gates.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"hidden_states must be (T, H) and gates (T, E); got {tuple(hidden_states.shape)} and {tuple(gates.shape)}"
        )
    num_experts, hidden = gates.shape[1], hidden_states.shape[1]
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[0] != num_experts or gate_up_proj.shape[2] != hidden:
        raise ValueError(f"gate_up_proj must be (E={num_experts}, 2I, H={hidden}); got {tuple(gate_up_proj.shape)}")
    intermediate = gate_up_proj.shape[1] // 2
    if tuple(down_proj.shape) != (num_experts, hidden, intermediate) or gate_up_proj.shape[1] % 2:
        raise ValueError(
            f"down_proj must be (E={num_experts}, H={hidden}, I={intermediate}) with gate_up_proj (E, 2I, H); "
            f"got {tuple(down_proj.shape)} and {tuple(gate_up_proj.shape)}"
        )


def sparse_moe_mlp(
    hidden_states: torch.Tensor,
    gates: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    implementation: str | None = None,
) -> torch.Tensor:
    """`(T, H) = sum_e gates[:, e, None] * down_e(silu(gate_e x) * up_e x)`, computing only nonzero (token, expert) pairs.

    `gates (T, E)` is non-negative and mostly zero; a token may use any number of experts, including none.
    `implementation` is one of `IMPLEMENTATIONS` (default: the fastest for the device).
    """
    _check_shapes(hidden_states, gates, gate_up_proj, down_proj)
    name = implementation or default_implementation(hidden_states.device)
    if name not in _FUNCTIONS:
        hint = " (triton is not installed: pip install triton)" if name == "triton" else ""
        raise ValueError(f"implementation must be one of {sorted(_FUNCTIONS)}; got {name!r}{hint}")
    return _FUNCTIONS[name](hidden_states, gates, gate_up_proj, down_proj)


__all__ = [
    "IMPLEMENTATIONS",
    "DispatchPlan",
    "build_dispatch_plan",
    "default_implementation",
    "dense_reference_moe_mlp",
    "sparse_moe_mlp",
    "triton_experts_forward",
]
