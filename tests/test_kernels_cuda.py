"""The expert implementations on a CUDA GPU against the dense einsum reference: fp32, bf16 and fp16, larger shapes.

Skipped without a GPU. fp32 runs with full fp32 products (torch's default `allow_tf32=False`). The tests named
`*autotun*` compile every candidate config: `benchmarks/gpu_check.sh` runs the others with fixed configs
(`REMOE_TRITON_DETERMINISTIC=1`, one compilation per kernel), then these in a step of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from remoe.kernels import IMPLEMENTATIONS, dense_reference_moe_mlp, sparse_moe_mlp

try:  # `tests` is a package (tests/__init__.py); without it pytest puts tests/ itself on sys.path
    from tests.test_kernels import (
        CASES,
        assert_autocast_runs_the_explicit_bf16_op,
        assert_matches_reference,
        make_inputs,
    )
except ImportError:
    from test_kernels import CASES, assert_autocast_runs_the_explicit_bf16_op, assert_matches_reference, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
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


requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@requires_triton
@requires_two_gpus
def test_triton_on_a_device_other_than_the_current_one():
    """Layers on cuda:1 while cuda:0 is current (device_map="auto"): Triton launches on the current device and stream,
    so every launch must run under its tensors' device."""
    with torch.cuda.device(0):
        inputs = make_inputs("random", dtype=torch.bfloat16, device="cuda:1", seed=7, scale=4)
        assert_matches_reference("triton", inputs, seed=7)
        assert torch.cuda.current_device() == 0


@requires_triton
def test_triton_under_bf16_autocast_runs_the_bf16_kernels():
    """fp32 weights and activations under bf16 autocast (the Trainer's `bf16: true`) reach the tensor-core kernels."""
    inputs = make_inputs("random", device="cuda", seed=8, scale=4)
    assert_autocast_runs_the_explicit_bf16_op("triton", inputs, seed=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_matches_reference("triton", inputs, tolerance=2e-2, seed=8)


@requires_triton
def test_triton_under_inductor_with_column_major_hidden_states():
    """The fake implementation's output layout matches the real op's (inductor checks it with `assert_size_stride`)."""
    hidden_states, gates, gate_up_proj, down_proj = make_inputs(
        "odd_sizes", dtype=torch.bfloat16, device="cuda", seed=9
    )
    hidden_states = hidden_states.t().contiguous().t()

    def loss_fn(hidden_states, gates):
        return sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="triton").float().sum()

    leaves = [hidden_states.requires_grad_(), gates.requires_grad_()]
    expected = [loss_fn(*leaves), *torch.autograd.grad(loss_fn(*leaves), leaves)]
    compiled_loss = torch.compile(loss_fn)(*leaves)
    actual = [compiled_loss, *torch.autograd.grad(compiled_loss, leaves)]
    for compiled, eager in zip(actual, expected, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


@requires_triton
def test_triton_experts_contract_never_synchronises():
    """`triton_experts_forward` knows its pair count from the shapes: no host synchronisation at all."""
    from remoe.kernels import triton_experts_forward

    hidden_states, gates, gate_up_proj, down_proj = make_inputs("random", dtype=torch.bfloat16, device="cuda", seed=10)
    experts = torch.nn.Module()
    experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gate_up_proj), torch.nn.Parameter(down_proj)
    top_k_weights, top_k_index = gates.float().topk(2, dim=-1)
    triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)  # autotuning synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")


_REPRODUCIBILITY_SCRIPT = """
import sys, torch
from remoe.kernels import sparse_moe_mlp
from tests.test_kernels import make_inputs
inputs = [t.requires_grad_() for t in make_inputs("every_expert_active", dtype=torch.bfloat16, device="cuda", seed=11,
                                                  scale=8)]
output = sparse_moe_mlp(*inputs, implementation="triton")
grads = torch.autograd.grad(output, inputs, torch.ones_like(output))
torch.save([output.cpu(), *(grad.cpu() for grad in grads)], sys.argv[1])
"""


@requires_triton
def test_fixed_configs_are_bitwise_reproducible_across_processes(tmp_path):
    """With `REMOE_TRITON_DETERMINISTIC=1` two processes give the same bits (autotuning picks its config by timing)."""
    environment = {**os.environ, "REMOE_TRITON_DETERMINISTIC": "1"}
    results = []
    for run in range(2):
        path = tmp_path / f"run{run}.pt"
        command = [sys.executable, "-c", _REPRODUCIBILITY_SCRIPT, str(path)]
        completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        results.append(torch.load(path))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


@requires_triton
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_autotuned_kernels_match_and_tune_without_a_flush_buffer(monkeypatch, dtype: torch.dtype):
    """Autotuning (pruned to the device's shared memory: fp32 configs of up to 288 KB exist) on a shape no other test
    tunes: correct results, and no 256 MB cache-flush buffer at the retune."""
    monkeypatch.delenv("REMOE_TRITON_DETERMINISTIC", raising=False)
    inputs = make_inputs("random", dtype=dtype, device="cuda", seed=12, scale=12)
    peaks = []
    for _ in range(2):  # the first call tunes, the second runs the tuned configs
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        output = sparse_moe_mlp(*leaves, implementation="triton")
        torch.autograd.grad(output, leaves, torch.ones_like(output))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - baseline)
    assert peaks[0] - peaks[1] < 64 * 2**20, peaks
    assert_matches_reference("triton", inputs, seed=12)


@requires_triton
def test_every_autotune_config_matches_reference(monkeypatch):
    """Each candidate config that fits the device, forced on every kernel in turn (bf16)."""
    from remoe.kernels import triton_moe

    monkeypatch.setenv("REMOE_TRITON_DETERMINISTIC", "1")
    limit = triton_moe._max_shared_memory(torch.cuda.current_device())
    inputs = make_inputs("random", dtype=torch.bfloat16, device="cuda", seed=13, scale=4)
    for index in range(max(len(candidates) for candidates in triton_moe.GPU_TILES.values())):

        def forced_tiles(kernel: str, element_size: int, index: int = index) -> triton_moe.Tiles:
            size = triton_moe.b_tiles(kernel, swiglu_b=True)
            fitting = [
                tiles
                for tiles in triton_moe.GPU_TILES[kernel]
                if triton_moe.shared_memory_bytes(tiles, element_size, size) <= limit
            ]
            return fitting[index % len(fitting)]

        monkeypatch.setattr(triton_moe, "fixed_tiles", forced_tiles)
        assert_matches_reference("triton", inputs, seed=13)
