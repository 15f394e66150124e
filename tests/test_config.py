import math

import pytest

from remoe import ReMoEConfig


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("num_experts_per_tok", {"num_experts": 4, "num_experts_per_tok": 5}),
        ("num_experts_per_tok", {"num_experts_per_tok": 0}),
        ("granularity", {"intermediate_size": 96, "granularity": 5}),
        ("granularity", {"granularity": 0}),
        ("l1_coef_multiplier", {"l1_coef_multiplier": 1.0}),
        ("l1_coef_multiplier", {"l1_coef_multiplier": 0.5}),
        ("l1_coef_multiplier", {"l1_coef_multiplier": math.inf}),
        ("l1_coef_init", {"l1_coef_init": -1e-8}),
        ("l1_coef_init", {"l1_coef_init": math.nan}),
        ("router_aux_loss_coef", {"router_aux_loss_coef": -0.01}),
        ("router_aux_loss_coef", {"router_aux_loss_coef": math.inf}),
        ("router_type", {"router_type": "softmax"}),
        ("load_balance", {"load_balance": "switch"}),
        ("experts_implementation", {"experts_implementation": "megablocks"}),
        ("num_key_value_heads", {"num_attention_heads": 6, "num_key_value_heads": 4}),
        ("num_experts", {"num_experts": 0}),
        ("moe_layer_freq", {"moe_layer_freq": 0}),
        ("moe_layer_freq", {"num_hidden_layers": 4, "moe_layer_freq": 5}),
        ("router_renormalize", {"router_type": "relu", "router_renormalize": True}),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        ReMoEConfig(**overrides)


def test_defaults_follow_the_paper():
    config = ReMoEConfig()
    assert (config.num_experts, config.num_experts_per_tok, config.granularity) == (8, 1, 1)
    assert config.router_type == "relu" and config.load_balance == "refined_l1"
    assert config.l1_coef_init == 1e-8 and config.l1_coef_multiplier == 1.2
    assert config.router_aux_loss_coef == 0.01 and config.initializer_range == 0.01
    assert config.target_sparsity == pytest.approx(0.875)
    assert config.rope_parameters["rope_theta"] == 1e6
    assert not config.tie_word_embeddings


def test_granularity_splits_experts_and_keeps_the_target():
    config = ReMoEConfig(num_experts=8, num_experts_per_tok=2, granularity=4, intermediate_size=256)
    assert config.num_routed_experts == 32
    assert config.expert_intermediate_size == 64
    assert config.routed_top_k == 8
    assert config.target_sparsity == pytest.approx(0.75)


def test_round_trip_through_json(tmp_path):
    config = ReMoEConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, router_type="topk")
    config.save_pretrained(tmp_path)
    loaded = ReMoEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_from_pretrained_overrides_are_checked_too(tmp_path):
    ReMoEConfig().save_pretrained(tmp_path)
    assert ReMoEConfig.from_pretrained(tmp_path, l1_coef_multiplier=1.5).l1_coef_multiplier == 1.5
    with pytest.raises(ValueError, match="l1_coef_multiplier"):
        ReMoEConfig.from_pretrained(tmp_path, l1_coef_multiplier=0.9)
