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
    from tests.test_kernels import (
        CASES,
        TOLERANCES,
        assert_autocast_runs_the_explicit_bf16_op,
        assert_matches_reference,
        make_inputs,
    )
except ImportError:
    from test_kernels import (
        CASES,
        TOLERANCES,
        assert_autocast_runs_the_explicit_bf16_op,
        assert_matches_reference,
        make_inputs,
    )

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


@in_this_process
def test_autocast_computes_in_the_autocast_dtype():
    """Under bf16 autocast the kernels get bf16 operands, as F.linear would (issue 12: they ran in fp32)."""
    assert_autocast_runs_the_explicit_bf16_op("triton", make_inputs("random", seed=9), seed=9)


# aot_dispatch is left to test_torch_compile: it differentiates, which a forward without saved activations cannot do
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_autograd_registration")


@in_this_process
def test_forward_and_backward_ops_pass_opcheck_with_non_contiguous_inputs():
    """The fake (meta) outputs have the real op's contiguous layout (issue 12: a column-major `hidden_states` made the
    fake output column-major, failing opcheck and inductor's `assert_size_stride`)."""
    from remoe.kernels.torch_moe import build_dispatch_plan
    from remoe.kernels.triton_moe import _backward_op, _forward_op, build_token_order

    hidden_states, gates, gate_up_proj, down_proj = make_inputs("odd_sizes", seed=10)
    hidden_states = hidden_states.t().contiguous().t()
    assert not hidden_states.is_contiguous()
    plan = build_dispatch_plan(gates)
    order = build_token_order(plan.token_idx, hidden_states.shape[0])
    pairs = (plan.token_idx, plan.offsets, order.token_offsets, order.pair_order)
    for save_gate_up, output_dtype in ((True, ()), (False, (torch.float64,))):
        args = (
            hidden_states.clone().requires_grad_(), plan.weights.clone().requires_grad_(), *pairs,
            gate_up_proj.clone().requires_grad_(), down_proj.clone().requires_grad_(), save_gate_up, *output_dtype,
        )  # fmt: skip
        torch.library.opcheck(_forward_op, args, test_utils=OPCHECK_TESTS)
    _, gate_up = _forward_op(hidden_states, plan.weights, *pairs, gate_up_proj, down_proj, True)
    grad_output = torch.randn(hidden_states.shape[1], hidden_states.shape[0]).t()
    backward_args = (grad_output, hidden_states, plan.weights, *pairs, gate_up_proj, down_proj, gate_up)
    torch.library.opcheck(_backward_op, (*backward_args, True, True, True, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_backward_op, (*backward_args, False, True, False, True), test_utils=OPCHECK_TESTS)


@in_this_process
@pytest.mark.parametrize("switch", ["environment", "torch_deterministic"])
def test_fixed_configs_bypass_the_autotuner(monkeypatch, switch: str):
    """`REMOE_TRITON_DETERMINISTIC=1` or `torch.use_deterministic_algorithms(True)`: one fixed config per kernel and
    dtype, never the (timing-dependent) autotuner."""
    from triton.runtime.autotuner import Autotuner

    def no_autotuning(*args, **kwargs):
        raise AssertionError("the autotuner ran")

    monkeypatch.setattr(Autotuner, "run", no_autotuning)
    if switch == "environment":
        monkeypatch.setenv("REMOE_TRITON_DETERMINISTIC", "1")
        assert_matches_reference("triton", make_inputs("random", seed=11), seed=11)
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_matches_reference("triton", make_inputs("random", seed=11), seed=11)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_pair_count_buckets_do_not_retune_in_training():
    """Few autotune buckets, and a steady pair count near T*k (power-of-two T, +-20 %) inside one of them (issue 12:
    one retune of every kernel at each new power of two of the pair count)."""
    from remoe.kernels.triton_moe import _pairs_bucket

    assert len({_pairs_bucket(pairs) for pairs in range(1, 1 << 21, 7)}) <= 3
    for tokens in (2**i for i in range(6, 21)):
        steady = range(int(0.8 * tokens), int(1.25 * tokens) + 1, max(1, tokens // 64))
        assert len({_pairs_bucket(pairs) for pairs in steady}) == 1, tokens
    assert all(edge % 16 == 0 for edge in {_pairs_bucket(pairs) for pairs in (1, 5000, 10**9)})


# Opt-in shared memory per block (bytes): A100 (sm80), RTX 30xx/40xx and L4/L40 (sm86/sm89), H100/H200 (sm90).
SHARED_MEMORY_LIMITS = {"sm80": 166912, "sm86": 101376, "sm90": 232448}


@pytest.mark.parametrize("element_size", [2, 4], ids=["16-bit", "fp32"])
@pytest.mark.parametrize("gpu", sorted(SHARED_MEMORY_LIMITS))
def test_every_kernel_has_configs_that_fit_shared_memory(gpu: str, element_size: int):
    """Every kernel keeps autotune candidates within the GPU's shared memory, and the fixed configs fit everywhere
    (issue 12: no fp32 gate-up config fit any non-Hopper GPU)."""
    from remoe.kernels.triton_moe import FIXED_TILES, GPU_TILES, b_tiles, shared_memory_bytes

    limit = SHARED_MEMORY_LIMITS[gpu]
    for kernel, candidates in GPU_TILES.items():
        for swiglu_b in (False, True):
            fits = [t for t in candidates if shared_memory_bytes(t, element_size, b_tiles(kernel, swiglu_b)) <= limit]
            assert fits, (kernel, swiglu_b)
            fixed = FIXED_TILES[(kernel, element_size)]
            assert shared_memory_bytes(fixed, element_size, b_tiles(kernel, swiglu_b)) <= min(
                SHARED_MEMORY_LIMITS.values()
            ), (kernel, fixed)


def test_autotuning_prunes_configs_that_do_not_fit(monkeypatch):
    import triton

    from remoe.kernels import triton_moe

    monkeypatch.setattr(triton_moe, "_max_shared_memory", lambda index: SHARED_MEMORY_LIMITS["sm86"])
    configs = [triton_moe._config(tiles) for tiles in triton_moe.GPU_TILES["gate_up"]]
    for dtype in (torch.float32, torch.bfloat16):
        named_args = {"x_ptr": torch.empty(1, dtype=dtype)}
        kept = triton_moe._prune_to_shared_memory("gate_up", configs, named_args, STORE_GATE_UP=True)
        sizes = [triton_moe.shared_memory_bytes(triton_moe._tiles_of(c), dtype.itemsize, 2) for c in kept]
        assert kept and max(sizes) <= SHARED_MEMORY_LIMITS["sm86"]
        assert len(kept) < len(configs)
    monkeypatch.setattr(triton_moe, "_max_shared_memory", lambda index: 1024)
    only = triton_moe._prune_to_shared_memory("matmul", configs, {"a_ptr": torch.empty(1)})
    assert len(only) == 1 and isinstance(only[0], triton.Config)


class _Experts(torch.nn.Module):
    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up_proj)
        self.down_proj = torch.nn.Parameter(down_proj)


@in_this_process
def test_experts_contract_with_sentinels_never_synchronises():
    """`triton_experts_forward` (Transformers' fixed-k contract): K=2 routes, some to expert parallelism's sentinel E,
    against the dense reference; no `nonzero` or `.item()` (each would drain the GPU queue once per layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from remoe.kernels import triton_experts_forward

    hidden_states, gates, gate_up_proj, down_proj = make_inputs("random", seed=12)
    num_rows, num_experts = gates.shape
    generator = torch.Generator().manual_seed(12)
    top_k_index = torch.stack([torch.randperm(num_experts + 1, generator=generator)[:2] for _ in range(num_rows)])
    top_k_weights = torch.rand(num_rows, 2, generator=generator, dtype=torch.float64).float()
    experts = _Experts(gate_up_proj, down_proj)
    hidden = hidden_states.clone().requires_grad_()
    weights = top_k_weights.clone().requires_grad_()

    class HostSyncs(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with HostSyncs() as mode:
        output = triton_experts_forward(experts, hidden, top_k_index, weights)
    assert mode.seen == []
    grad_output = torch.randn(output.shape, generator=generator)
    grads = torch.autograd.grad(output, [hidden, weights, experts.gate_up_proj, experts.down_proj], grad_output)

    reference_leaves = [t.detach().double().requires_grad_() for t in (hidden_states, top_k_weights, gate_up_proj)]
    reference_down = down_proj.double().requires_grad_()
    dense_gates = torch.zeros(num_rows, num_experts + 1, dtype=torch.float64)
    dense_gates = dense_gates.scatter(1, top_k_index, reference_leaves[1])[:, :num_experts]
    reference = dense_reference_moe_mlp(reference_leaves[0], dense_gates, reference_leaves[2], reference_down)
    reference_grads = torch.autograd.grad(reference, [*reference_leaves, reference_down], grad_output.double())
    torch.testing.assert_close(output.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        atol = 1e-4 * reference_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=atol)
    assert torch.all(grads[1][top_k_index == num_experts] == 0)
