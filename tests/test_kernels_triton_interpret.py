"""The Triton kernels under the Triton interpreter on CPU (`TRITON_INTERPRET=1`), against the dense einsum reference.

The interpreter must be on before the first `import triton`, and `torch._dynamo` (imported by transformers, hence by
`remoe`) imports triton. When this module is imported after that has happened (the usual case under `pytest tests/`),
its tests run in a fresh interpreter process through `test_in_fresh_process` instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_INTERPRETER_ON = os.environ.get("TRITON_INTERPRET") == "1"
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
    _INTERPRETER_ON = True

import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from remoe.kernels import dense_reference_moe_mlp, sparse_moe_mlp  # noqa: E402

try:  # `tests` is a package (tests/__init__.py); without it pytest puts tests/ itself on sys.path
    from tests.test_kernels import CASES, TOLERANCES, assert_matches_reference, make_inputs
except ImportError:
    from test_kernels import CASES, TOLERANCES, assert_matches_reference, make_inputs

in_this_process = pytest.mark.skipif(
    not _INTERPRETER_ON, reason="triton was imported before TRITON_INTERPRET=1: run by test_in_fresh_process"
)

# The interpreter rounds fp32 -> bf16 towards zero (the GPU rounds to nearest even), doubling the rounding error of
# the bf16 intermediates.
INTERPRETER_TOLERANCES = {**TOLERANCES, torch.bfloat16: 4e-2}


@pytest.mark.skipif(_INTERPRETER_ON, reason="the interpreter is on in this process: the tests below run here")
def test_in_fresh_process():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command, cwd=Path(__file__).parents[1], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]


@in_this_process
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_fp32(case: str):
    assert_matches_reference("triton", make_inputs(case, seed=1), seed=1)


@in_this_process
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("case", ["random", "odd_sizes"])
def test_triton_matches_reference_half(case: str, dtype: torch.dtype):
    assert_matches_reference("triton", make_inputs(case, dtype=dtype, seed=2), tolerance=INTERPRETER_TOLERANCES[dtype])


@in_this_process
def test_non_contiguous_inputs():
    hidden_states, gates, gate_up_proj, down_proj = make_inputs("odd_sizes", seed=3)
    column_major = (
        hidden_states.t().contiguous().t(),
        gates,
        gate_up_proj.transpose(1, 2).contiguous().transpose(1, 2),
        down_proj.transpose(1, 2).contiguous().transpose(1, 2),
    )
    assert not column_major[0].is_contiguous() and not column_major[2].is_contiguous()
    assert_matches_reference("triton", column_major, seed=3)


@in_this_process
def test_fp32_gates_with_bf16_activations():
    hidden_states, gates, gate_up_proj, down_proj = make_inputs("random", dtype=torch.bfloat16, seed=4)
    gates = gates.float().requires_grad_()
    output = sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="triton")
    assert output.dtype == torch.bfloat16
    output.float().square().sum().backward()
    assert gates.grad.dtype == torch.float32
    reference = dense_reference_moe_mlp(*(t.detach().double() for t in (hidden_states, gates, gate_up_proj, down_proj)))
    torch.testing.assert_close(output.double(), reference, rtol=0.04, atol=0.04 * reference.abs().max().item())


@in_this_process
def test_inference_and_partial_gradients():
    inputs = make_inputs("token_without_experts", seed=5)
    with torch.no_grad():
        inference = sparse_moe_mlp(*inputs, implementation="triton")
    reference = dense_reference_moe_mlp(*inputs)
    torch.testing.assert_close(inference, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())

    hidden_states, gates, gate_up_proj, down_proj = inputs
    down_proj = down_proj.clone().requires_grad_()  # frozen hidden states, gates and gate_up_proj
    sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="triton").sum().backward()
    reference_down = down_proj.detach().clone().requires_grad_()
    dense_reference_moe_mlp(hidden_states, gates, gate_up_proj, reference_down).sum().backward()
    torch.testing.assert_close(down_proj.grad, reference_down.grad, rtol=1e-4, atol=1e-5)


@in_this_process
def test_deterministic():
    inputs = make_inputs("random", seed=6)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        output = sparse_moe_mlp(*leaves, implementation="triton")
        runs.append([output, *torch.autograd.grad(output, leaves, torch.ones_like(output))])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@in_this_process
def test_mismatched_dtypes_raise():
    hidden_states, gates, gate_up_proj, down_proj = make_inputs("random")
    with pytest.raises(ValueError, match="one dtype"):
        sparse_moe_mlp(hidden_states, gates, gate_up_proj.double(), down_proj, implementation="triton")


@in_this_process
def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the forward operator."""
    from remoe.kernels.torch_moe import build_dispatch_plan
    from remoe.kernels.triton_moe import _forward_op, build_token_order

    hidden_states, gates, gate_up_proj, down_proj = make_inputs("single_token", seed=7)
    plan = build_dispatch_plan(gates)
    order = build_token_order(plan.token_idx, hidden_states.shape[0])
    args = (
        hidden_states.requires_grad_(), plan.weights.requires_grad_(), plan.token_idx, plan.offsets,
        order.token_offsets, order.pair_order, gate_up_proj.requires_grad_(), down_proj.requires_grad_(), True,
    )  # fmt: skip
    torch.library.opcheck(
        _forward_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


@in_this_process
def test_torch_compile():
    """Dynamo traces the operators through their fake implementations and registered autograd (no codegen)."""
    inputs = make_inputs("token_without_experts", seed=8)

    def loss_fn(hidden_states, gates, gate_up_proj, down_proj):
        return sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="triton").square().sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


@in_this_process
def test_whole_model_is_the_same_with_every_experts_implementation():
    from remoe import ReMoEConfig, ReMoEForCausalLM

    config = ReMoEConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        initializer_range=0.1,
        l1_coef_init=0.01,
    )
    torch.manual_seed(0)
    model = ReMoEForCausalLM(config).train()
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for implementation in ("eager", "grouped_mm", "triton"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        output = model(tokens, labels=tokens)
        output.loss.backward()
        results[implementation] = (output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        model.controller.reset_statistics()
    reference_logits, reference_grads = results["eager"]
    for implementation in ("grouped_mm", "triton"):
        logits, grads = results[implementation]
        torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)
