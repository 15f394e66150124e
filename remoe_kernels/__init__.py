"""Sparse expert kernels for variable experts per token (ReLU routing), with torch fallbacks.

`sparse_moe_mlp` runs one of `IMPLEMENTATIONS`: "eager" (a loop over the experts that received tokens),
"batched_mm" (one batched matmul over the pairs' gathered expert weights), "grouped_mm"
(`torch.nn.functional.grouped_mm` over the expert-sorted pairs) and, when Triton is installed, "triton" (the kernels
of `remoe.kernels.triton_moe`, for CUDA tensors or for CPU tensors under `TRITON_INTERPRET=1`). Triton is imported on
first use only: the interpreter must be switched on before `import triton`.

`triton_experts_forward` is the same kernels behind Transformers' experts contract
`(module, hidden_states, top_k_index, top_k_weights)`, which the ReMoE model registers as `experts_implementation="triton"`;
its pair count is known from the shapes, so it never synchronises with the host.

The default on CUDA (`default_implementation`) stays "grouped_mm"; "triton" is opt-in until a GPU benchmark
(`benchmarks/gpu_check.sh`) measures it ahead. Under autocast, "triton" and "grouped_mm" (whose kernels have no autocast
rule) compute in the autocast dtype, with their operands cast as `F.linear` would cast them; "eager" and "batched_mm"
get that from autocast itself. `REMOE_TRITON_DETERMINISTIC=1` (or `torch.use_deterministic_algorithms(True)`) gives
Triton results that are bitwise the same across processes: one fixed kernel config instead of autotuning.
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


def _check_triton_device(hidden_states: torch.Tensor) -> None:
    if hidden_states.device.type != "cuda" and not _triton_interpreter_enabled():
        raise ValueError(
            f"implementation='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run on "
            f"{hidden_states.device.type}; got {hidden_states.device.type} tensors (use 'eager' or 'grouped_mm')"
        )


def _triton_sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj) -> torch.Tensor:
    _check_triton_device(hidden_states)
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
    """The default for `device`: "grouped_mm" where torch has it, also on CUDA (Triton stays opt-in until a GPU
    benchmark measures it ahead of grouped_mm)."""
    return "grouped_mm" if hasattr(F, "grouped_mm") else "eager"


def triton_experts_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The Triton kernels behind Transformers' experts contract: rows (R, H) routed to `top_k_index (R, K)` with
    `top_k_weights (R, K)`; `module` holds `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`. An index of E or more
    (expert parallelism's sentinel) contributes nothing."""
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or len(top_k_index) != len(hidden_states):
        raise ValueError(
            f"top_k_index and top_k_weights must both be (R={len(hidden_states)}, K); got "
            f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
        )
    _check_triton_device(hidden_states)
    from .triton_moe import triton_top_k_moe_mlp

    return triton_top_k_moe_mlp(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj)


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
