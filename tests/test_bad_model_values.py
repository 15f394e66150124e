"""Bad model values: `ReMoEConfig` refuses every invalid value with an error naming the field, a bad config.json is
one line naming the file and the field from every command, and the default experts implementation runs any valid
dimensions (`grouped_mm` needs 16-byte aligned rows: the model runs its exact loop where they are not).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

import remoe
from remoe import modeling_remoe
from remoe.checkpoints import CheckpointError, check_checkpoint
from remoe.kernels import dense_reference_moe_mlp
from remoe.training.cli import main as remoe_main

from .conftest import WORDS, randomize_experts, save_tiny_checkpoint

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
)


# ---- ReMoEConfig values --------------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"hidden_size": 34}, ["hidden_size", "num_attention_heads"]),
    ({"hidden_size": 30}, ["hidden_size", "num_attention_heads"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads", "num_key_value_heads"]),
    ({"head_dim": 0}, ["head_dim"]),
    ({"head_dim": -4}, ["head_dim"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings"]),
    ({"max_position_embeddings": -5}, ["max_position_embeddings"]),
    ({"rms_norm_eps": -1.0}, ["rms_norm_eps"]),
    ({"rms_norm_eps": 0.0}, ["rms_norm_eps"]),
    ({"rms_norm_eps": float("nan")}, ["rms_norm_eps"]),
    ({"rms_norm_eps": float("inf")}, ["rms_norm_eps"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, ["rope_theta"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, ["rope_theta"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, ["rope_theta"]),
    ({"rope_parameters": {"rope_type": "nosuch"}}, ["rope_type", "'default'", "'linear'"]),
    ({"attention_dropout": 1.5}, ["attention_dropout", "[0, 1)"]),
    ({"attention_dropout": 1.0}, ["attention_dropout"]),
    ({"attention_dropout": -0.1}, ["attention_dropout"]),
    ({"attention_dropout": float("nan")}, ["attention_dropout"]),
    ({"hidden_act": "nosuch"}, ["hidden_act", "'silu'", "'gelu'"]),
    ({"router_hash_seed": 2**63}, ["router_hash_seed", "2**63"]),
    ({"router_hash_seed": 2**70}, ["router_hash_seed"]),
    ({"router_hash_seed": -1}, ["router_hash_seed"]),
    ({"initializer_range": float("inf")}, ["initializer_range"]),
    ({"initializer_range": -0.01}, ["initializer_range"]),
    ({"pad_token_id": 64}, ["pad_token_id", "vocab_size=64"]),
    ({"pad_token_id": -7}, ["pad_token_id"]),
    ({"bos_token_id": 1000}, ["bos_token_id"]),
    ({"eos_token_id": 64}, ["eos_token_id"]),
    ({"eos_token_id": [1, 64]}, ["eos_token_id"]),
    ({"dtype": "float99"}, ["dtype", "float99"]),
    ({"torch_dtype": "float99"}, ["torch_dtype", "float99"]),
]


@pytest.mark.parametrize(("overrides", "names"), BAD_VALUES, ids=[repr(case[0]) for case in BAD_VALUES])
def test_bad_values_are_refused_naming_the_field(overrides: dict[str, Any], names: list[str]):
    with pytest.raises(ValueError) as error:
        remoe.ReMoEConfig(**{**BASE, **overrides})
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize(("overrides", "names"), BAD_VALUES, ids=[repr(case[0]) for case in BAD_VALUES])
def test_bad_values_in_a_config_dict_are_refused_naming_the_field(overrides: dict[str, Any], names: list[str]):
    """`from_dict` (config.json, `from_pretrained`) refuses them too."""
    with pytest.raises(ValueError) as error:
        remoe.ReMoEConfig.from_dict({"model_type": "remoe", **BASE, **overrides})
    for name in names:
        assert name in str(error.value)


BAD_TYPES = [
    ("num_hidden_layers", "2", "`num_hidden_layers` must be an int, got str '2'"),
    ("hidden_size", 32.0, "`hidden_size` must be an int, got float 32.0"),
    ("router_type", None, "`router_type` must be a string, got None"),
    ("rope_parameters", "abc", "`rope_parameters` must be a dict or None, got str 'abc'"),
    ("router_aux_loss_coef", True, "`router_aux_loss_coef` must be a number, got bool True"),
    ("l1_coef_multiplier", "1.2", "`l1_coef_multiplier` must be a number, got str '1.2'"),
    ("layer_types", ["nosuch", "nosuch"], "`layer_types` entries must be in"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_TYPES, ids=[case[0] for case in BAD_TYPES])
def test_wrong_types_in_a_config_dict_are_one_value_error_naming_the_field(name: str, value: Any, message: str):
    """huggingface_hub's strict-dataclass errors (a field's type, a class validator) become a `ValueError`."""
    with pytest.raises(ValueError) as error:
        remoe.ReMoEConfig.from_dict({"model_type": "remoe", **BASE, name: value})
    assert message in str(error.value)
    assert isinstance(error.value.__cause__, StrictDataclassError)


@pytest.mark.parametrize("name", ["router_aux_loss_coef", "l1_coef_multiplier", "l1_coef_init", "rms_norm_eps"])
def test_bools_are_refused_for_float_fields(name: str):
    with pytest.raises((ValueError, StrictDataclassError)) as error:
        remoe.ReMoEConfig(**{**BASE, name: True})
    assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("router_aux_loss_coef", 0),
        ("l1_coef_multiplier", 2),
        ("l1_coef_init", 0),
        ("rms_norm_eps", 1),
        ("initializer_range", 0),
        ("attention_dropout", 0),
        ("router_capacity_factor", 2),
        ("router_jitter_eps", 1),
    ],
)
def test_ints_are_accepted_for_float_fields_and_stored_as_floats(name: str, value: int):
    config = remoe.ReMoEConfig(**{**BASE, name: value})
    assert getattr(config, name) == value and type(getattr(config, name)) is float
    loaded = remoe.ReMoEConfig.from_dict({"model_type": "remoe", **BASE, name: value})
    assert getattr(loaded, name) == value and type(getattr(loaded, name)) is float


@pytest.mark.parametrize(
    "overrides",
    [
        {"hidden_size": 34, "num_attention_heads": 2, "head_dim": 16},  # head_dim given: no divisibility needed
        {"pad_token_id": 63, "bos_token_id": 0, "eos_token_id": [0, 63]},
        {"attention_dropout": 0.99},
        {"router_hash_seed": 2**63 - 1},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000}},  # an int theta (as JSON writes it)
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
        {"hidden_act": "gelu_new"},
        {"dtype": "bfloat16"},
        {"max_position_embeddings": 1},
    ],
    ids=repr,
)
def test_valid_edge_values_are_accepted(overrides: dict[str, Any]):
    config = remoe.ReMoEConfig(**{**BASE, **overrides})
    assert remoe.ReMoEConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


# ---- bad config.json files from the command line -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_model_values") / "model"
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    save_tiny_checkpoint(folder, texts, vocab_size=300)
    return folder


BAD_CONFIG_JSON = {
    "str layers": ({"num_hidden_layers": "2"}, "`num_hidden_layers` must be an int, got str '2'"),
    "float hidden": ({"hidden_size": 32.0}, "`hidden_size` must be an int, got float 32.0"),
    "null router": ({"router_type": None}, "`router_type` must be a string, got None"),
    "rope string": ({"rope_parameters": "abc"}, "`rope_parameters` must be a dict or None"),
    "layer types": ({"layer_types": ["nosuch", "nosuch"]}, "`layer_types` entries must be in"),
    "activation": ({"hidden_act": "nosuch"}, "`hidden_act` must be one of"),
    "rope type": ({"rope_parameters": {"rope_type": "nosuch", "rope_theta": 1e6}}, "rope_type"),
    "negative head_dim": ({"head_dim": -8}, "`head_dim` must be >= 1, got -8"),
    "dtype": ({"dtype": "float99"}, "`dtype` must be a torch dtype name"),
    "misspelt key": ({"num_expert": 4}, "unknown key 'num_expert'; did you mean 'num_experts'?"),
}


def _break_config(checkpoint: Path, destination: Path, changes: dict[str, Any]) -> Path:
    destination.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file():
            (destination / path.name).write_bytes(path.read_bytes())
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, **changes}))
    return destination


@pytest.mark.parametrize("case", list(BAD_CONFIG_JSON))
def test_check_checkpoint_names_config_json_and_the_field(checkpoint, tmp_path, case):
    changes, message = BAD_CONFIG_JSON[case]
    model = _break_config(checkpoint, tmp_path / "model", changes)
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(model)
    assert str(error.value).startswith(f"{model / 'config.json'}: ")
    assert message in str(error.value)


@pytest.mark.parametrize("command", ["generate", "analyze", "convert"])
@pytest.mark.parametrize("case", list(BAD_CONFIG_JSON))
def test_every_bad_config_json_is_exit_status_2_and_one_line(checkpoint, tmp_path, capsys, command, case):
    changes, message = BAD_CONFIG_JSON[case]
    model = _break_config(checkpoint, tmp_path / "model", changes)
    argv = {
        "generate": ["generate", str(model), "--prompt", "alpha"],
        "analyze": ["analyze", str(model), "--output_dir", str(tmp_path / "analysis")],
        "convert": ["convert", str(model), "--output_dir", str(tmp_path / "converted"), "--router_type", "topk"],
    }[command]
    capsys.readouterr()
    assert remoe_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"remoe {command}: error: ")]
    assert len(errors) == 1, err
    assert f"{model / 'config.json'}: " in errors[0]
    assert message in errors[0]


def test_the_unbroken_checkpoint_passes(checkpoint):
    """The fixture the cases above break is itself a good checkpoint (so each case fails for its own change)."""
    assert check_checkpoint(checkpoint).num_hidden_layers == 2


# ---- grouped_mm alignment: the exact loop where grouped_mm cannot run ----------------------------------------------

# (hidden, intermediate, granularity): expert widths 66 and 2 and 1, hidden not a multiple of 4 (fp32 rows of 136 B).
UNALIGNED = [(32, 66, 1), (32, 64, 32), (32, 64, 64), (34, 64, 1)]


def _experts(config: remoe.ReMoEConfig) -> modeling_remoe.ReMoEExperts:
    return randomize_experts(modeling_remoe.ReMoEExperts(config))


def _unaligned_config(hidden: int, intermediate: int, granularity: int, **overrides) -> remoe.ReMoEConfig:
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16} if hidden % 4 else {}
    values = {**BASE, "hidden_size": hidden, "intermediate_size": intermediate, "granularity": granularity}
    return remoe.ReMoEConfig(**{**values, **heads, **overrides})


def test_alignment_rule():
    assert modeling_remoe.grouped_mm_strides_are_aligned(_experts(_unaligned_config(32, 64, 1)))
    for dims in UNALIGNED:
        assert not modeling_remoe.grouped_mm_strides_are_aligned(_experts(_unaligned_config(*dims)))
    bf16 = _experts(_unaligned_config(32, 36, 1)).to(torch.bfloat16)  # 36 fp32 elements are 144 B, 36 bf16 72 B
    assert modeling_remoe.grouped_mm_strides_are_aligned(_experts(_unaligned_config(32, 36, 1)))
    assert not modeling_remoe.grouped_mm_strides_are_aligned(bf16)


@pytest.mark.parametrize("routing", ["relu", "topk"])
@pytest.mark.parametrize(("hidden", "intermediate", "granularity"), UNALIGNED)
def test_grouped_mm_with_unaligned_rows_matches_the_dense_reference(routing, hidden, intermediate, granularity):
    """Forward and every gradient (rows, gates, both weights) of the `grouped_mm` experts equal the dense einsum
    reference, for ReLU pair rows (0..E experts per token) and TopK rows."""
    config = _unaligned_config(hidden, intermediate, granularity)
    config._experts_implementation = "grouped_mm"
    experts = _experts(config)
    num_experts = experts.num_experts
    generator = torch.Generator().manual_seed(4)
    tokens = 24
    hidden_states = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    if routing == "relu":
        gates = torch.relu(torch.randn(tokens, num_experts, generator=generator) - 0.8)
        gates[0] = 0.0  # a token with no expert
        gates = gates.requires_grad_()
        output = modeling_remoe.experts_over_active_pairs(experts, hidden_states, gates)
    else:
        probs = torch.randn(tokens, num_experts, generator=generator).softmax(-1).requires_grad_()
        top = probs.topk(2, dim=-1)
        gates = probs
        output = experts(hidden_states, top.indices, top.values)
    grad_output = torch.randn(tokens, hidden, generator=generator)
    output.backward(grad_output)

    leaves = [hidden_states, gates, experts.gate_up_proj, experts.down_proj]
    reference_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
    reference_gates = reference_leaves[1]
    if routing == "topk":  # only the kept probabilities gate the experts
        reference_gates = reference_gates * torch.zeros_like(probs).scatter(1, top.indices, 1.0).double()
    reference = dense_reference_moe_mlp(reference_leaves[0], reference_gates, *reference_leaves[2:])
    reference.backward(grad_output.double())

    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-5)
    names = ["hidden_states", "gates", "gate_up_proj", "down_proj"]
    active = (reference_gates.detach() != 0).to(torch.float64)
    for name, leaf, reference_leaf in zip(names, leaves, reference_leaves, strict=True):
        expected = reference_leaf.grad * active if name == "gates" else reference_leaf.grad
        torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


def _dense_reference_experts(module, hidden_states, top_k_index, top_k_weights):
    """Transformers' experts contract computed densely: every expert on every row, weighted by its gate (0 for the
    experts the row does not use)."""
    gates = torch.zeros(len(hidden_states), module.num_experts, dtype=top_k_weights.dtype)
    gates = gates.scatter_add(1, top_k_index, top_k_weights)
    return dense_reference_moe_mlp(hidden_states, gates, module.gate_up_proj, module.down_proj)


@pytest.mark.parametrize(("intermediate", "granularity"), [(66, 1), (64, 32)])  # expert widths 66 and 2
@pytest.mark.parametrize("router_type", ["relu", "topk"])
def test_a_training_step_with_unaligned_experts_matches_the_dense_reference(
    monkeypatch, intermediate, granularity, router_type
):
    """The default model (`grouped_mm`) trains a step: its loss, every gradient and the updated weights equal a copy
    whose experts run the dense reference."""
    monkeypatch.setitem(modeling_remoe.REMOE_EXPERTS_FUNCTIONS, "dense_reference", _dense_reference_experts)
    torch.manual_seed(0)
    config = _unaligned_config(32, intermediate, granularity, router_type=router_type, initializer_range=0.2)
    model = remoe.ReMoEForCausalLM(config).train()
    assert model.config._experts_implementation == "grouped_mm"  # the default, which needs 16-byte aligned rows
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "dense_reference"

    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    losses = []
    for candidate in (model, reference):
        optimizer = torch.optim.SGD(candidate.parameters(), lr=0.1)
        loss = candidate(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, parameter), reference_parameter in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        torch.testing.assert_close(parameter.grad, reference_parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(parameter, reference_parameter, rtol=1e-5, atol=1e-6, msg=name)
    assert any(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters() if "experts" in name)


def test_from_pretrained_reads_safetensors_only_unless_told_otherwise(tmp_path):
    """A folder with only pickle weights is refused by `ReMoEForCausalLM.from_pretrained` and the Auto class; an
    explicit `use_safetensors=False` still loads it (through Transformers' `weights_only` unpickler)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = remoe.ReMoEConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4,
    )  # fmt: skip
    model = remoe.ReMoEForCausalLM(config)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    for loader in (remoe.ReMoEForCausalLM, AutoModelForCausalLM):
        with pytest.raises(OSError, match=r"model\.safetensors"):
            loader.from_pretrained(tmp_path)
    loaded = remoe.ReMoEForCausalLM.from_pretrained(tmp_path, use_safetensors=False)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
