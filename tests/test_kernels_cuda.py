"""The expert implementations on a CUDA GPU against the dense einsum reference: fp32, bf16 and fp16, larger shapes.

Skipped without a GPU. fp32 runs with full fp32 products (torch's default `allow_tf32=False`).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from remoe.kernels import IMPLEMENTATIONS, dense_reference_moe_mlp, sparse_moe_mlp

try:  # `tests` is a package (tests/__init__.py); without it pytest puts tests/ itself on sys.path
    from tests.test_kernels import CASES, assert_matches_reference, make_inputs
except ImportError:
    from test_kernels import CASES, assert_matches_reference, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif("triton" not in IMPLEMENTATIONS, reason="triton is not installed")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.mark.parametrize("implementation", ["triton", "grouped_mm", "eager"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(implementation: str, dtype: torch.dtype, case: str):
    if implementation not in IMPLEMENTATIONS:
        pytest.skip(f"{implementation} is not available")
    for seed in range(2):
        inputs = make_inputs(case, dtype=dtype, device="cuda", seed=seed, scale=4)
        assert_matches_reference(implementation, inputs, seed=seed)


@requires_triton
@pytest.mark.parametrize("granularity", [1, 8])
def test_triton_paper_shape_bf16(granularity: int):
    """H=768, I=3072/G, 8*G experts, 2k tokens with about G experts each."""
    generator = torch.Generator().manual_seed(granularity)
    tokens, hidden, intermediate, experts = 2048, 768, 3072 // granularity, 8 * granularity
    logits = torch.randn(tokens, experts, generator=generator) + 0.5 * torch.randn(tokens, 1, generator=generator)
    threshold = logits.flatten().kthvalue(logits.numel() - tokens * granularity + 1).values
    inputs = (
        torch.randn(tokens, hidden, generator=generator),
        torch.relu(logits - threshold),
        torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5,
        torch.randn(experts, hidden, intermediate, generator=generator) / intermediate**0.5,
    )
    assert_matches_reference("triton", tuple(t.cuda().bfloat16() for t in inputs))


@requires_triton
def test_triton_is_deterministic():
    inputs = make_inputs("every_expert_active", dtype=torch.bfloat16, device="cuda", seed=3, scale=8)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        output = sparse_moe_mlp(*leaves, implementation="triton")
        runs.append([output, *torch.autograd.grad(output, leaves, torch.ones_like(output))])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@requires_triton
def test_triton_forward_synchronises_only_for_the_pair_count():
    inputs = make_inputs("random", dtype=torch.bfloat16, device="cuda", seed=4, scale=4)
    sparse_moe_mlp(*inputs, implementation="triton")  # autotuning synchronises: do it first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparse_moe_mlp(*inputs, implementation="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronising = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(synchronising) <= 1, [str(w.message) for w in synchronising]


@requires_triton
def test_triton_under_torch_compile():
    inputs = make_inputs("token_without_experts", dtype=torch.bfloat16, device="cuda", seed=5, scale=4)

    def step(hidden_states, gates, gate_up_proj, down_proj):
        return (
            sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="triton")
            .float()
            .square()
            .sum()
        )

    results = []
    for fn in (step, torch.compile(step)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


@requires_triton
def test_triton_without_gradients_matches():
    inputs = make_inputs("random", dtype=torch.float16, device="cuda", seed=6, scale=4)
    with torch.inference_mode():
        output = sparse_moe_mlp(*inputs, implementation="triton")
    reference = dense_reference_moe_mlp(*(t.double() for t in inputs))
    torch.testing.assert_close(output.double(), reference, rtol=3e-3, atol=3e-3 * reference.abs().max().item())
