"""The experts paths that Hub users get without `remoe` (issue 17, items 1 and 5).

- Remote-code default: the shipped model files, imported as a standalone copy with every `remoe` module blocked, pick
  `grouped_mm`, also where Transformers cannot read their source (its heuristic would fall back to `eager`).
- Exactness: the default and `eager`, in the package and in remote-code mode, match the dense einsum reference in the
  forward and in every gradient, for ReLU routes (0..E experts per token, K=1 pair rows), TopK routes and
  expert-parallel sentinels.
- `eager` and the kernel loops: one weight-gradient buffer in backward, not one per expert.
- Decoding runs no matmul for experts without rows (counted with the profiler, which also sees the matmuls inside
  `grouped_mm`'s CPU kernel), and the gate multiplies the smaller of the (pairs, I) activation and (pairs, H) output.
"""

import importlib
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import remoe
from remoe import modeling_remoe
from remoe.kernels import dense_reference_moe_mlp, sparse_moe_mlp

from .conftest import randomize_experts

MODEL_FILES_DIR = Path(remoe.__file__).parent
_COPIES = itertools.count()


pytestmark = pytest.mark.usefixtures("one_thread")


def import_remote_copy(tmp_path: Path):
    """The shipped model files imported as their own package, as Transformers imports Hub remote code, with every
    `remoe` module blocked (as where `remoe` is not installed)."""
    package = f"remote_remoe_{next(_COPIES)}"
    folder = tmp_path / package
    folder.mkdir()
    for name in ("modeling_remoe.py", "configuration_remoe.py"):
        shutil.copy(MODEL_FILES_DIR / name, folder / name)
    (folder / "__init__.py").write_text("")
    hidden = {name: module for name, module in sys.modules.items() if name == "remoe" or name.startswith("remoe.")}
    sys.modules.update(dict.fromkeys(hidden))  # None: `import remoe...` raises ImportError
    sys.path.insert(0, str(tmp_path))
    try:
        modeling = importlib.import_module(f"{package}.modeling_remoe")
    finally:
        sys.path.remove(str(tmp_path))
        for name in hidden:
            del sys.modules[name]
        sys.modules.update(hidden)
    assert "triton" not in modeling.REMOE_EXPERTS_FUNCTIONS  # the copy did not reach remoe.kernels
    return modeling, importlib.import_module(f"{package}.configuration_remoe")


@pytest.fixture(params=["package", "remote_code"])
def code(request, tmp_path):
    """(modeling module, configuration module): the installed package, or a remote-code copy without `remoe`."""
    if request.param == "package":
        return modeling_remoe, remoe.configuration_remoe
    return import_remote_copy(tmp_path)


def _config(configuration, num_experts=8, hidden=32, intermediate=64, granularity=1, **overrides):
    values = dict(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=num_experts,
        granularity=granularity,
    )
    values.update(overrides)
    return configuration.ReMoEConfig(**values)


def _experts(modeling, config, implementation: str):
    config._experts_implementation = implementation
    return randomize_experts(modeling.ReMoEExperts(config))


def _relu_gates(tokens: int, num_experts: int, seed: int = 2) -> torch.Tensor:
    """ReLU gates with 0..E experts per token: some tokens with none, some with several, one expert unused."""
    generator = torch.Generator().manual_seed(seed)
    gates = torch.relu(torch.randn(tokens, num_experts, generator=generator) - 0.8)
    gates[0] = 0.0  # a token with no expert
    gates[1] = torch.rand(num_experts, generator=generator) + 0.1  # a token with every expert
    gates[2:, -1] = 0.0  # an expert only token 1 uses
    return gates


def _topk_gates(tokens: int, num_experts: int, top_k: int = 2, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.randn(tokens, num_experts, generator=generator).softmax(-1)
    top = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, top.indices, top.values)


class _GivenGates(torch.nn.Module):
    """A router that returns the given gates (and them as logits)."""

    def __init__(self, gates: torch.Tensor):
        super().__init__()
        self.gates = gates

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gates, self.gates


def _run_block_experts(modeling, experts, hidden_states, gates, routing: str, top_k: int = 2) -> torch.Tensor:
    """The MoE block's experts step after the router: ReLU routes as pair rows (`experts_over_active_pairs`), TopK
    routes through `ReMoESparseMoeBlock.forward` with a router that returns `gates`."""
    if routing == "relu":
        return modeling.experts_over_active_pairs(experts, hidden_states, gates)
    block = modeling.ReMoESparseMoeBlock(experts.config)
    block.router, block.experts, block.top_k = _GivenGates(gates), experts, top_k
    return block(hidden_states[None])[0]


def _check_against_reference(modeling, experts, routing: str, tokens: int = 24) -> None:
    num_experts, hidden = experts.num_experts, experts.down_proj.shape[1]
    generator = torch.Generator().manual_seed(4)
    hidden_states = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    gates = (_relu_gates if routing == "relu" else _topk_gates)(tokens, num_experts).requires_grad_()
    grad_output = torch.randn(tokens, hidden, generator=generator)

    output = _run_block_experts(modeling, experts, hidden_states, gates, routing)
    output.backward(grad_output)
    leaves = [hidden_states, gates, experts.gate_up_proj, experts.down_proj]
    reference_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
    reference = dense_reference_moe_mlp(*reference_leaves)
    reference.backward(grad_output.double())

    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-5)
    active = gates.detach() != 0  # gate gradients are defined on the active entries (zero elsewhere)
    names = ["hidden_states", "gates", "gate_up_proj", "down_proj"]
    for name, leaf, reference_leaf in zip(names, leaves, reference_leaves, strict=True):
        expected = reference_leaf.grad
        if name == "gates":
            expected = expected * active
        torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


# --- the remote-code default ---------------------------------------------------------------------------------------


def test_remote_code_default_is_grouped_mm(tmp_path):
    modeling, configuration = import_remote_copy(tmp_path)
    model = modeling.ReMoEForCausalLM(_config(configuration))
    assert model.config._experts_implementation == "grouped_mm"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    for name in [n for n in sys.modules if n == "remoe" or n.startswith("remoe.")]:
        del sys.modules[name]
    sys.modules["remoe"] = None  # `remoe` is not installed

    import torch
    from safetensors.torch import save_file
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    modeling = sys.modules[type(model).__module__]
    assert "triton" not in modeling.REMOE_EXPERTS_FUNCTIONS
    ids = torch.tensor([[3, 17, 5, 9, 41, 2, 8, 30]])
    model.train()
    output = model(ids, labels=ids)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(1, model.config.hidden_size)
    with torch.no_grad():
        _, gates = model.model.layers[0].mlp.router(hidden)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            modeling.experts_over_active_pairs(experts, hidden, gates)
    matmuls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    info = torch.tensor([matmuls, int((gates != 0).sum()), model.config._experts_implementation == "grouped_mm"])
    tensors = {"logits": output.logits.detach(), "info": info, **{"grad." + k: v for k, v in grads.items()}}
    save_file(tensors, sys.argv[2])
    """
)


def test_from_pretrained_with_remote_code_and_no_remoe_trains_exactly_and_decodes_without_empty_experts(tmp_path):
    """`from_pretrained(trust_remote_code=True)` in a process where `remoe` cannot be imported: the default is
    `grouped_mm`; logits and every gradient equal the installed package's; one decoded token runs 2 matmuls per
    expert it uses and none for the others."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = _config(remoe.configuration_remoe, num_experts=8, hidden=32, intermediate=64)
    model = remoe.ReMoEForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.router.weight.normal_(std=0.5)
    model.save_pretrained(tmp_path / "model")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    out = tmp_path / "remote.safetensors"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = load_file(out)
    matmuls, active, is_grouped_mm = remote["info"].tolist()
    assert is_grouped_mm
    assert 0 < active < config.num_experts
    assert matmuls == 2 * active

    model.train()
    ids = torch.tensor([[3, 17, 5, 9, 41, 2, 8, 30]])
    output = model(ids, labels=ids)
    output.loss.backward()
    torch.testing.assert_close(remote["logits"], output.logits.detach(), rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(remote["grad." + name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- exactness against the dense einsum reference ------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("routing", ["relu", "topk"])
@pytest.mark.parametrize(("hidden", "intermediate"), [(32, 16), (16, 32)])  # I < H: gate on the activation
def test_experts_match_the_dense_reference_forward_and_gradients(code, implementation, routing, hidden, intermediate):
    modeling, configuration = code
    config = _config(configuration, num_experts=6, hidden=hidden, intermediate=intermediate)
    experts = _experts(modeling, config, implementation)
    _check_against_reference(modeling, experts, routing)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("routing", ["relu", "topk"])
def test_decoding_matches_the_dense_reference(code, implementation, routing):
    """No gradients and few tokens: the path that skips empty experts gives the reference values."""
    modeling, configuration = code
    experts = _experts(modeling, _config(configuration, num_experts=8, hidden=32, intermediate=16), implementation)
    hidden_states = torch.randn(3, 32)
    gates = (_relu_gates if routing == "relu" else _topk_gates)(3, 8)
    with torch.no_grad():
        output = _run_block_experts(modeling, experts, hidden_states, gates, routing)
    expected = dense_reference_moe_mlp(
        hidden_states.double(), gates.double(), *(p.double() for p in experts.parameters())
    )
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("hidden", "intermediate"), [(32, 16), (512, 1024)])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_decoding_a_batch_matches_the_reference_for_every_rows_per_expert(code, implementation, hidden, intermediate):
    """A decoded batch sends 1 to 9 rows to each expert (large experts' blocks of a few rows multiply the other way
    round on CPU): every block size gives the reference values."""
    modeling, configuration = code
    config = _config(configuration, num_experts=9, hidden=hidden, intermediate=intermediate)
    experts = _experts(modeling, config, implementation)
    assert (experts.down_proj[0].numel() >= modeling._LARGE_MATRIX) == (hidden == 512)
    expert_of_row = torch.cat([torch.full((count,), expert) for expert, count in enumerate(range(1, 10))])
    hidden_states = torch.randn(len(expert_of_row), hidden)
    gates = torch.zeros(len(expert_of_row), 9).index_put_(
        (torch.arange(len(expert_of_row)), expert_of_row), torch.rand(len(expert_of_row)) + 0.1
    )
    with torch.no_grad():
        output = _run_block_experts(modeling, experts, hidden_states, gates, "topk", top_k=1)
    expected = dense_reference_moe_mlp(
        hidden_states.double(), gates.double(), *(p.double() for p in experts.parameters())
    )
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)


def test_eager_handles_unsorted_rows_and_expert_parallel_sentinels(code):
    """K=2 rows in any order, some routed to the sentinel index E (another rank's expert): the sentinel routes
    contribute nothing and get no gradient; the rest match a per-row reference."""
    modeling, configuration = code
    experts = _experts(modeling, _config(configuration, num_experts=4, hidden=16, intermediate=8), "eager")
    rows, num_experts = 10, 4
    hidden_states = torch.randn(rows, 16, requires_grad=True)
    top_k_index = torch.randint(0, num_experts + 1, (rows, 2))
    top_k_index[0] = num_experts  # a row with two sentinels
    top_k_weights = torch.rand(rows, 2, requires_grad=True)
    output = experts(hidden_states, top_k_index, top_k_weights)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)

    gates = torch.zeros(rows, num_experts + 1).scatter_add(1, top_k_index, top_k_weights.detach())[:, :num_experts]
    leaves = [hidden_states.detach().double().requires_grad_(), gates.double().requires_grad_()]
    weights = [p.detach().double().requires_grad_() for p in (experts.gate_up_proj, experts.down_proj)]
    reference = dense_reference_moe_mlp(*leaves, *weights)
    reference.backward(grad_output.double())
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_states.grad.double(), leaves[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.gate_up_proj.grad.double(), weights[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.down_proj.grad.double(), weights[1].grad, rtol=1e-5, atol=1e-6)
    sentinel = top_k_index == num_experts
    assert torch.all(top_k_weights.grad[sentinel] == 0)
    expected_weight_grad = leaves[1].grad.gather(1, top_k_index.clamp(max=num_experts - 1))
    torch.testing.assert_close(
        top_k_weights.grad[~sentinel].double(), expected_weight_grad[~sentinel], rtol=1e-5, atol=1e-6
    )


def test_whole_model_default_equals_eager_in_remote_code_mode(tmp_path):
    """A remote-code model, trained one step's forward and backward with its default and with `eager`."""
    modeling, configuration = import_remote_copy(tmp_path)
    torch.manual_seed(0)
    model = modeling.ReMoEForCausalLM(_config(configuration, num_experts=4, granularity=2)).train()
    ids = torch.randint(0, 64, (2, 9))
    results = {}
    for implementation in ("grouped_mm", "eager"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        output = model(ids, labels=ids)
        output.loss.backward()
        results[implementation] = output.logits.detach(), [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(results["eager"][0], results["grouped_mm"][0], rtol=1e-5, atol=1e-5)
    for eager_grad, default_grad in zip(results["eager"][1], results["grouped_mm"][1], strict=True):
        torch.testing.assert_close(eager_grad, default_grad, rtol=1e-4, atol=1e-6)


# --- no per-expert weight-gradient buffers -------------------------------------------------------------------------


class _FreshWeightSizedResults(TorchDispatchMode):
    """Counts the ops that return a fresh (not `out=`) tensor shaped like one expert's weight."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = {tuple(shape) for shape in shapes}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        is_out_variant = func._overloadpacket is not None and func._schema.overload_name.startswith("out")
        is_view = func._schema.is_mutable or any(ret.alias_info is not None for ret in func._schema.returns)
        if isinstance(result, torch.Tensor) and tuple(result.shape) in self.shapes and not (is_out_variant or is_view):
            self.count += 1
        return result


@pytest.mark.parametrize("path", ["model_eager", "kernels_eager"])
def test_eager_backward_allocates_no_weight_gradient_per_expert(path):
    config = _config(remoe.configuration_remoe, num_experts=8, hidden=32, intermediate=48)
    experts = _experts(modeling_remoe, config, "eager")
    hidden_states = torch.randn(40, 32, requires_grad=True)
    gates = _relu_gates(40, 8).requires_grad_()
    if path == "model_eager":
        output = modeling_remoe.experts_over_active_pairs(experts, hidden_states, gates)
    else:
        output = sparse_moe_mlp(hidden_states, gates, experts.gate_up_proj, experts.down_proj, implementation="eager")
    counter = _FreshWeightSizedResults([experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]])
    with counter:
        output.sum().backward()
    assert counter.count == 0
    assert experts.gate_up_proj.grad.shape == experts.gate_up_proj.shape


class _DirtyEmptyTensors(TorchDispatchMode):
    """Fills every tensor `empty`/`empty_like` returns with NaN, as reused memory may hold anything."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (
            func in (torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format)
            and result.is_floating_point()
        ):
            result.fill_(float("nan"))
        return result


@pytest.mark.parametrize("path", ["model_eager", "kernels_eager"])
def test_eager_weight_gradient_of_experts_without_rows_is_zero_in_uninitialised_memory(path):
    config = _config(remoe.configuration_remoe, num_experts=8, hidden=32, intermediate=48)
    experts = _experts(modeling_remoe, config, "eager")
    hidden_states = torch.randn(40, 32, requires_grad=True)
    gates = _relu_gates(40, 8)
    gates[:, [2, 5]] = 0.0  # two experts without rows
    gates.requires_grad_()
    if path == "model_eager":
        output = modeling_remoe.experts_over_active_pairs(experts, hidden_states, gates)
    else:
        output = sparse_moe_mlp(hidden_states, gates, experts.gate_up_proj, experts.down_proj, implementation="eager")
    with _DirtyEmptyTensors():
        output.sum().backward()
    for weight in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(weight.grad).all()
        assert not weight.grad[[2, 5]].any()
        assert weight.grad[[0, 1]].abs().sum() > 0


# --- decoding skips empty experts ----------------------------------------------------------------------------------


def _matmuls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key in ("aten::mm", "aten::addmm", "aten::bmm"))


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("routing", ["relu", "topk"])
def test_decoding_runs_no_matmul_for_experts_without_rows(code, implementation, routing):
    modeling, configuration = code
    experts = _experts(modeling, _config(configuration, num_experts=16), implementation)
    hidden_states = torch.randn(2, 32)
    gates = (
        _topk_gates(2, 16) if routing == "topk" else torch.zeros(2, 16).index_fill_(1, torch.tensor([3, 9, 10]), 0.5)
    )
    used = int((gates != 0).any(0).sum())
    assert used < 16
    with torch.no_grad():
        matmuls = _matmuls(lambda: _run_block_experts(modeling, experts, hidden_states, gates, routing))
    assert matmuls == 2 * used


def test_cpu_decoding_picks_the_loop_for_few_rows_and_for_large_experts_up_to_8_rows_per_expert(code):
    """`grouped_mm` configs decode through the loop with fewer rows than experts, and, for experts of at least 2**19
    H·I elements (bound by reading their weights), up to 8 rows per expert on average; not with gradients."""
    modeling, configuration = code
    large = _experts(modeling, _config(configuration, num_experts=2, hidden=512, intermediate=1024), "grouped_mm")
    small = _experts(modeling, _config(configuration, num_experts=2, hidden=32, intermediate=64), "grouped_mm")
    with torch.no_grad():
        picks = {
            (name, rows): modeling._decode_runs_the_loop(experts, torch.zeros(rows, 1), torch.zeros(rows, 1))
            for name, experts in (("large", large), ("small", small))
            for rows in (1, 4, 15, 16)
        }
    assert picks == {
        ("large", 1): True,
        ("large", 4): True,
        ("large", 15): True,
        ("large", 16): False,
        ("small", 1): True,
        ("small", 4): False,
        ("small", 15): False,
        ("small", 16): False,
    }
    assert not modeling._decode_runs_the_loop(large, torch.zeros(1, 1), torch.zeros(1, 1))  # gradients enabled


def test_kernel_loop_runs_no_matmul_for_experts_without_tokens():
    gate_up_proj, down_proj = torch.randn(16, 64, 32), torch.randn(16, 32, 32)
    hidden_states, gates = torch.randn(2, 32), torch.zeros(2, 16).index_fill_(1, torch.tensor([3, 9]), 0.5)
    with torch.no_grad():
        matmuls = _matmuls(
            lambda: sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation="eager")
        )
    assert matmuls == 2 * 2


# --- the gate on the smaller tensor --------------------------------------------------------------------------------


class _MultiplicationWidths(TorchFunctionMode):
    """The last dimension of every elementwise product."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul) and result.dim() == 2:
            self.widths.append(result.shape[-1])
        return result


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_model_eager_and_decoding_gate_the_activation_when_it_is_narrower(code, implementation):
    """I < H (fine-grained experts): the gate multiplies the (pairs, I) activation before `down_proj`, never the
    (pairs, H) output; `eager` always, and the default while decoding (no gradients, few tokens on CPU)."""
    modeling, configuration = code
    experts = _experts(
        modeling, _config(configuration, num_experts=8, hidden=32, intermediate=64, granularity=4), implementation
    )
    assert experts.down_proj.shape[1:] == (32, 16)
    hidden_states, gates = torch.randn(3, 32), _relu_gates(3, 8)
    context = torch.no_grad() if implementation == "grouped_mm" else torch.enable_grad()
    widths = _MultiplicationWidths()
    with context, widths:
        modeling.experts_over_active_pairs(experts, hidden_states, gates)
    assert widths.widths and 32 not in widths.widths, widths.widths


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_kernel_paths_gate_the_activation_when_it_is_narrower(implementation):
    hidden_states, gates = torch.randn(12, 64), _relu_gates(12, 4)
    gate_up_proj, down_proj = torch.randn(4, 32, 64), torch.randn(4, 64, 16)
    widths = _MultiplicationWidths()
    with widths:
        sparse_moe_mlp(hidden_states, gates, gate_up_proj, down_proj, implementation=implementation)
    assert widths.widths and 64 not in widths.widths, widths.widths


def test_eager_computes_every_product_with_the_given_linear_into(code):
    """`eager_experts_forward(..., linear_into=f)`: every expert product, forward and backward, is `f(block, weight,
    out)` (`out = block @ weight.T`), 2 forward and 4 backward per expert with rows, with the default's results."""
    modeling, configuration = code
    experts = _experts(modeling, _config(configuration, num_experts=6, hidden=16, intermediate=32), "eager")
    calls = []

    def recorded(block, weight, out):
        calls.append((tuple(block.shape), tuple(weight.shape)))
        torch.mm(block, weight.t(), out=out)

    hidden_states = torch.randn(10, 16, requires_grad=True)
    top_k_index = torch.tensor([0, 2, 2, 5, 0, 2, 5, 5, 0, 2])[:, None]
    top_k_weights = torch.rand(10, 1)
    results = []
    for linear_into in (recorded, None):
        extra = () if linear_into is None else (linear_into,)
        output = modeling.eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights, *extra)
        grads = torch.autograd.grad(output.sum(), [hidden_states, experts.gate_up_proj, experts.down_proj])
        results.append([output, *grads])
    assert len(calls) == 6 * 3  # experts 0, 2 and 5 have rows
    assert (4, 16) in [call[0] for call in calls]  # expert 2's 4 rows times gate_up
    for recorded_result, default_result in zip(*results, strict=True):
        torch.testing.assert_close(recorded_result, default_result, rtol=1e-6, atol=1e-6)
