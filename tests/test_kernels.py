"""`remoe.kernels.sparse_moe_mlp` against the dense einsum reference: torch paths on CPU, plus argument validation.

The Triton kernels are checked in `test_kernels_triton_interpret.py` (interpreter, CPU) and `test_kernels_cuda.py`
(GPU); both reuse the cases and the comparison defined here. This module must not import triton: the interpreter
can only be switched on before the first `import triton`.
"""

from __future__ import annotations

import pytest
import torch

from remoe.kernels import (
    IMPLEMENTATIONS,
    build_dispatch_plan,
    default_implementation,
    dense_reference_moe_mlp,
    sparse_moe_mlp,
)
from remoe.kernels.torch_moe import grouped_mm_supported

CASES = (
    "random",
    "token_without_experts",
    "expert_without_tokens",
    "all_on_one_expert",
    "single_token",
    "no_active_gate",
    "every_expert_active",
    "odd_sizes",
)

# Largest error allowed, relative to the largest entry of the float64 reference, per input dtype. bf16 and fp16
# intermediates (gate_up, the SiLU-gated product, the gate-scaled output gradient) are rounded to the input dtype.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make_inputs(
    case: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    scale: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(hidden_states, gates, gate_up_proj, down_proj)` for one edge case, with randomized small shapes.

    Gates are ReLU-like: a per-token shift gives each token its own number of experts (often none, sometimes all).
    `scale` multiplies the token count and the sizes, for the GPU tests.
    """
    generator = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    num_tokens = randint(17, 40) * scale
    hidden, intermediate = 8 * randint(2, 5) * scale, 8 * randint(2, 5) * scale
    num_experts = randint(3, 8)
    if case == "single_token":
        num_tokens = 1
    elif case == "odd_sizes":
        num_tokens, hidden, intermediate = 23 * scale, 19 * scale + 2, 13 * scale + 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    hidden_states = randn(num_tokens, hidden)
    gate_up_proj = randn(num_experts, 2 * intermediate, hidden) / hidden**0.5
    down_proj = randn(num_experts, hidden, intermediate) / intermediate**0.5
    shift = 0.7 * randn(num_tokens, 1) - 0.8
    gates = torch.relu(randn(num_tokens, num_experts) + shift)
    if case == "token_without_experts":
        gates[::3] = 0
    elif case == "expert_without_tokens":
        gates[:, [0, num_experts // 2]] = 0
    elif case == "all_on_one_expert":
        gates = torch.zeros_like(gates)
        gates[:, num_experts - 2] = randn(num_tokens).abs() + 0.1
    elif case == "single_token":
        gates = torch.zeros_like(gates)
        gates[0, [0, num_experts - 1]] = torch.tensor([0.3, 1.2], dtype=gates.dtype)
    elif case == "no_active_gate":
        gates = torch.zeros_like(gates)
    elif case == "every_expert_active":
        gates = randn(num_tokens, num_experts).abs() + 0.05
    elif case != "random" and case != "odd_sizes":
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden_states, gates, gate_up_proj, down_proj))


def _gradients(output: torch.Tensor, inputs: list[torch.Tensor], grad_output: torch.Tensor) -> list[torch.Tensor]:
    if not output.requires_grad:  # the eager loop with no active gate never touches its inputs
        return [torch.zeros_like(t) for t in inputs]
    return list(torch.autograd.grad(output, inputs, grad_output, allow_unused=True, materialize_grads=True))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    expected = expected.to(torch.float64)
    atol = tolerance * max(expected.abs().max().item(), 1e-6) if expected.numel() else tolerance
    torch.testing.assert_close(
        actual.to(torch.float64), expected, rtol=tolerance, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_matches_reference(
    implementation: str,
    inputs: tuple[torch.Tensor, ...],
    *,
    tolerance: float | None = None,
    seed: int = 0,
) -> None:
    """Output and the gradients of all four inputs equal the float64 dense einsum reference.

    The gate gradient is compared on the active (nonzero) gates and must be exactly zero elsewhere.
    """
    tolerance = tolerance if tolerance is not None else TOLERANCES[inputs[0].dtype]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    output = sparse_moe_mlp(*leaves, implementation=implementation)
    assert output.shape == inputs[0].shape and output.dtype == inputs[0].dtype
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output)
    grads = _gradients(output, leaves, grad_output)

    reference_leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    reference = dense_reference_moe_mlp(*reference_leaves)
    reference_grads = torch.autograd.grad(reference, reference_leaves, grad_output.to(torch.float64))

    _assert_close(output, reference, tolerance, "output")
    active = inputs[1] != 0
    names = ("hidden_states", "gates", "gate_up_proj", "down_proj")
    for name, grad, reference_grad in zip(names, grads, reference_grads, strict=True):
        assert grad.shape == reference_grad.shape and grad.dtype == inputs[names.index(name)].dtype, name
        if name == "gates":
            assert torch.all(grad[~active] == 0), "the gate gradient must be zero on inactive gates"
            grad, reference_grad = grad[active], reference_grad[active]
        _assert_close(grad, reference_grad, tolerance, f"grad of {name}")


TORCH_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


@pytest.mark.parametrize("implementation", TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_torch_paths_match_reference_fp32(implementation: str, case: str):
    for seed in range(3):
        assert_matches_reference(implementation, make_inputs(case, seed=seed), seed=seed)


@pytest.mark.parametrize("implementation", TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["random", "all_on_one_expert", "odd_sizes"])
def test_torch_paths_match_reference_half(implementation: str, dtype: torch.dtype, case: str):
    assert_matches_reference(implementation, make_inputs(case, dtype=dtype))


def test_grouped_mm_falls_back_to_the_loop_on_unaligned_sizes():
    aligned, unaligned = make_inputs("random"), make_inputs("odd_sizes")
    assert grouped_mm_supported(aligned[0], aligned[2], aligned[3])
    assert not grouped_mm_supported(unaligned[0], unaligned[2], unaligned[3])
    assert_matches_reference("grouped_mm", unaligned)


def test_dispatch_plan_is_sorted_by_expert_with_end_offsets():
    gates = make_inputs("expert_without_tokens", seed=3)[1]
    plan = build_dispatch_plan(gates)
    assert torch.all(plan.expert_idx[1:] >= plan.expert_idx[:-1])
    counts = (gates != 0).sum(0)
    assert plan.offsets.dtype == torch.int32 and torch.equal(plan.offsets.long(), counts.cumsum(0))
    assert torch.equal(plan.weights, gates[plan.token_idx, plan.expert_idx])
    assert torch.all(plan.weights != 0) and plan.token_idx.numel() == int(counts.sum())


def test_default_implementation_is_grouped_mm_until_triton_is_measured_ahead():
    expected = "grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "eager"
    for device in (torch.device("cpu"), torch.device("cuda"), "cuda:0"):
        assert default_implementation(device) == expected


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((5, 8, 1), (5, 3), (3, 12, 8), (3, 8, 6)), "hidden_states"),
        (((5, 8), (4, 3), (3, 12, 8), (3, 8, 6)), "hidden_states"),
        (((5, 8), (5, 3), (4, 12, 8), (3, 8, 6)), "gate_up_proj"),
        (((5, 8), (5, 3), (3, 12, 7), (3, 8, 6)), "gate_up_proj"),
        (((5, 8), (5, 3), (3, 11, 8), (3, 8, 5)), "down_proj"),
        (((5, 8), (5, 3), (3, 12, 8), (3, 8, 5)), "down_proj"),
        (((5, 8), (5, 3), (3, 12, 8), (3, 6, 8)), "down_proj"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    tensors = [torch.randn(*shape) for shape in shapes]
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(ValueError, match=match):
            sparse_moe_mlp(*tensors, implementation=implementation)


def test_well_formed_shapes_pass_the_checks():
    shapes = ((5, 8), (5, 3), (3, 12, 8), (3, 8, 6))
    assert sparse_moe_mlp(*[torch.randn(*shape) for shape in shapes], implementation="eager").shape == (5, 8)


def test_unknown_implementation_raises():
    with pytest.raises(ValueError, match="implementation must be one of"):
        sparse_moe_mlp(*make_inputs("random"), implementation="cutlass")


@pytest.mark.skipif("triton" not in IMPLEMENTATIONS, reason="triton is not installed")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_moe_mlp(*make_inputs("random"), implementation="triton")


def assert_autocast_runs_the_explicit_bf16_op(implementation: str, inputs: tuple[torch.Tensor, ...], seed: int = 0):
    """fp32 `inputs` under bf16 autocast give what the same op gives when fed bf16 operands by hand (gates stay fp32),
    as F.linear would be fed: bitwise equal gradients (their cast back to fp32 is exact), and an output in fp32 that
    differs only by the final rounding to bf16."""
    device_type = inputs[0].device.type
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(inputs[0].shape, generator=generator).bfloat16().to(inputs[0].device)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(device_type, dtype=torch.bfloat16):
        output = sparse_moe_mlp(*leaves, implementation=implementation)
    assert output.dtype == torch.float32
    grads = torch.autograd.grad(output, leaves, grad_output.float())
    explicit_leaves = [
        t.detach().to(torch.bfloat16 if i != 1 else t.dtype).requires_grad_() for i, t in enumerate(inputs)
    ]
    explicit = sparse_moe_mlp(*explicit_leaves, implementation=implementation)
    explicit_grads = torch.autograd.grad(explicit, explicit_leaves, grad_output)
    names = ("hidden_states", "gates", "gate_up_proj", "down_proj")
    for name, grad, explicit_grad in zip(names, grads, explicit_grads, strict=True):
        assert grad.dtype == torch.float32 and torch.equal(grad.to(explicit_grad.dtype), explicit_grad), name
    torch.testing.assert_close(explicit.float(), output, rtol=2**-7, atol=1e-6 * output.abs().max().item())


def test_grouped_mm_under_autocast_computes_in_the_autocast_dtype():
    """`grouped_mm` has no autocast rule: under bf16 autocast its operands are cast as F.linear would cast them (it
    computed in fp32 before)."""
    assert_autocast_runs_the_explicit_bf16_op("grouped_mm", make_inputs("random", seed=5), seed=5)
