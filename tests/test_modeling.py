import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

import remoe
from remoe import ReMoEForCausalLM, ReMoEModel
from remoe.kernels import dense_reference_moe_mlp
from remoe.modeling_remoe import ReMoEMLP, ReMoESparseMoeBlock

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")  # the experts implementations that run on CPU


def _tokens(batch=2, length=12, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _moe_block(config) -> ReMoESparseMoeBlock:
    return ReMoEForCausalLM(config).model.layers[0].mlp


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("router_type", "granularity"), [("relu", 1), ("topk", 1), ("relu", 2), ("topk", 4)])
def test_moe_block_equals_dense_einsum_reference(make_config, implementation, router_type, granularity):
    config = make_config(
        router_type=router_type, granularity=granularity, num_experts_per_tok=2, experts_implementation=implementation
    )
    block = _moe_block(config)
    hidden = torch.randn(3, 10, config.hidden_size)
    _, gates = block.router(hidden.reshape(-1, config.hidden_size))
    expected = dense_reference_moe_mlp(
        hidden.reshape(-1, config.hidden_size), gates, block.experts.gate_up_proj, block.experts.down_proj
    ).reshape(hidden.shape)
    torch.testing.assert_close(block(hidden), expected, rtol=1e-5, atol=1e-6)


def test_relu_routing_uses_a_varying_number_of_experts(make_config):
    config = make_config(num_experts=8)
    block = _moe_block(config)
    _, gates = block.router(torch.randn(256, config.hidden_size))
    experts_per_token = (gates > 0).sum(dim=1)
    assert experts_per_token.min() >= 0 and experts_per_token.max() <= 8
    assert len(experts_per_token.unique()) >= 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_token_with_no_active_expert_gets_exactly_zero_output(make_config, implementation):
    config = make_config(experts_implementation=implementation)
    block = _moe_block(config)
    direction = torch.randn(config.hidden_size)
    with torch.no_grad():
        block.router.weight.copy_(direction + 0.01 * torch.randn_like(block.router.weight))
    hidden = torch.randn(1, 6, config.hidden_size)
    hidden[0, 0] = direction  # every logit of token 0 is positive
    hidden[0, 2] = -direction  # every logit of token 2 is negative
    hidden.requires_grad_(True)
    _, gates = block.router(hidden.reshape(-1, config.hidden_size))
    assert (gates[2] == 0).all() and (gates[0] > 0).all()
    output = block(hidden)
    assert torch.equal(output[0, 2], torch.zeros(config.hidden_size))
    output.sum().backward()
    for tensor in (hidden.grad, block.router.weight.grad, block.experts.gate_up_proj.grad):
        assert torch.isfinite(tensor).all()


def test_topk_routing_uses_exactly_k_experts(make_config):
    config = make_config(router_type="topk", num_experts=8, num_experts_per_tok=2)
    _, gates = _moe_block(config).router(torch.randn(100, config.hidden_size))
    assert ((gates > 0).sum(dim=1) == 2).all()


def test_dense_model_has_no_router_and_matches_the_active_size(make_config):
    config = make_config(router_type="dense", num_experts_per_tok=2)
    model = ReMoEForCausalLM(config)
    assert not any("router" in name or "experts" in name for name, _ in model.named_parameters())
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, ReMoEMLP) and mlp.up_proj.out_features == 2 * config.intermediate_size
    assert model.controller is None and model.update_l1_coef() == {}
    output = model(_tokens(), labels=_tokens())
    assert output.aux_loss is None and torch.isfinite(output.loss)


def test_moe_layer_frequency_interleaves_dense_layers(make_config):
    model = ReMoEForCausalLM(make_config(num_hidden_layers=4, moe_layer_freq=2))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["ReMoEMLP", "ReMoESparseMoeBlock", "ReMoEMLP", "ReMoESparseMoeBlock"]


def test_router_learns_from_the_language_model_loss_alone(make_config):
    model = ReMoEForCausalLM(make_config(l1_coef_init=0.0))
    model.train()
    tokens = _tokens()
    output = model(tokens, labels=tokens)
    assert output.aux_loss > 0  # the regulariser is computed but weighted by lambda = 0
    output.loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0


def test_training_loss_adds_lambda_times_the_regulariser(make_config):
    model = ReMoEForCausalLM(make_config(l1_coef_init=0.5))
    tokens = _tokens()
    model.eval()
    lm_loss = model(tokens, labels=tokens).loss
    model.train()
    output = model(tokens, labels=tokens)
    torch.testing.assert_close(output.loss, lm_loss + 0.5 * output.aux_loss)


def test_output_router_logits(make_config):
    config = make_config(num_hidden_layers=3)
    output = ReMoEForCausalLM(config)(_tokens(batch=2, length=5), output_router_logits=True)
    assert len(output.router_logits) == 3
    assert all(logits.shape == (10, config.num_routed_experts) for logits in output.router_logits)


def test_padding_is_left_out_of_the_routing_statistics(make_config):
    model = ReMoEForCausalLM(make_config())
    model.train()
    tokens = _tokens(batch=2, length=8)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    model(tokens, attention_mask=mask, labels=tokens)
    assert model.controller.num_tokens.item() == 13


def test_sdpa_and_eager_attention_agree(make_config):
    model = ReMoEForCausalLM(make_config()).eval()
    tokens = _tokens()
    sdpa = model(tokens).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(tokens).logits, sdpa, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(make_config):
    tokens = _tokens()
    grads, counts = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ReMoEForCausalLM(make_config(l1_coef_init=0.1))
        if checkpointing:
            # Transformers 5.23 renamed gradient_checkpointing_enable; the old name stays for older releases.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        model(tokens, labels=tokens).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        counts.append(model.controller.tokens_per_expert.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.equal(counts[0], counts[1])  # the recomputation does not count tokens twice


def test_bf16_forward_and_backward(make_config):
    model = ReMoEForCausalLM(make_config()).to(torch.bfloat16)
    assert model.controller.l1_coef.dtype == torch.float32
    model.train()
    tokens = _tokens()
    output = model(tokens, labels=tokens)
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.loss)
    output.loss.backward()


@pytest.mark.parametrize("router_type", ["relu", "topk", "dense"])
def test_generation_with_and_without_cache_is_identical(make_config, router_type):
    model = ReMoEForCausalLM(make_config(router_type=router_type)).eval()
    prompt = _tokens(batch=2, length=5)
    kwargs = dict(max_new_tokens=8, pad_token_id=0)
    cached = model.generate(prompt, do_sample=False, use_cache=True, **kwargs)
    uncached = model.generate(prompt, do_sample=False, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        samples.append(model.generate(prompt, do_sample=True, top_k=0, use_cache=use_cache, **kwargs))
    assert torch.equal(*samples)


def test_auto_classes_and_save_load_round_trip(make_config, tmp_path):
    config = make_config(l1_coef_init=3.7e-5)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, ReMoEForCausalLM)
    model.controller.l1_coef.mul_(1.2)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_remoe.py", "configuration_remoe.py"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = _tokens()
    assert torch.equal(loaded(tokens).logits, model.eval()(tokens).logits)
    assert loaded.controller.l1_coef.item() == model.controller.l1_coef.item()
    assert isinstance(AutoModel.from_pretrained(tmp_path), ReMoEModel)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.controller.l1_coef.item() == model.controller.l1_coef.item()


def test_experts_implementation_through_from_pretrained(make_config, tmp_path):
    ReMoEForCausalLM(make_config()).save_pretrained(tmp_path)
    tokens = _tokens()
    logits = {}
    for implementation in IMPLEMENTATIONS:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
        assert model.config._experts_implementation == implementation
        logits[implementation] = model(tokens).logits
    for implementation in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(logits["eager"], logits[implementation], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="experts_implementation"):
        AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="megablocks")


def test_remote_code_loads_without_the_remoe_package(make_config, tmp_path):
    model = ReMoEForCausalLM(make_config()).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    tokens = _tokens()
    save_file({"tokens": tokens, "logits": model(tokens).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["remoe"] = None  # make `import remoe` fail
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        try:
            import remoe  # noqa: F401
            raise SystemExit("remoe is importable")
        except ImportError:
            pass
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        diff = (model(expected["tokens"]).logits - expected["logits"]).abs().max().item()
        print("MAXDIFF", diff)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("MAXDIFF")[1]) < 1e-6


def test_public_names():
    assert remoe.ReMoEConfig.model_type == "remoe"
    assert callable(remoe.kernels.sparse_moe_mlp)


def test_regularisers_match_hand_computed_values():
    from remoe.modeling_remoe import l1_regularization_loss, switch_load_balancing_loss

    logits = (torch.tensor([[1.0, -1.0], [2.0, 3.0]]),)
    # refined: f = E/(kT) * active counts = 1 * [2, 1]; gate sums [3, 3]; (2*3 + 1*3) / T
    assert l1_regularization_loss(logits, 1, "refined_l1").item() == pytest.approx(4.5)
    assert l1_regularization_loss(logits, 1, "l1").item() == pytest.approx(3.0)
    uniform = (torch.zeros(6, 4),)  # every expert equally likely: the balanced optimum is 1 for any k
    assert switch_load_balancing_loss(uniform, 1).item() == pytest.approx(1.0)
    assert switch_load_balancing_loss(uniform, 2).item() == pytest.approx(1.0)
    skewed = (torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 6),)
    assert switch_load_balancing_loss(skewed, 1).item() > 3.0


def test_regularisers_are_zero_not_nan_for_a_batch_of_padding_only(make_config):
    from remoe.modeling_remoe import l1_regularization_loss, switch_load_balancing_loss

    empty = (torch.zeros(0, 4, requires_grad=True),)
    for loss in (l1_regularization_loss(empty, 1, "refined_l1"), switch_load_balancing_loss(empty, 1)):
        assert loss.item() == 0.0
    for router_type in ("relu", "topk"):
        model = remoe.ReMoEForCausalLM(make_config(router_type=router_type, router_aux_loss_coef=0.01))
        input_ids = torch.randint(0, 97, (2, 6))
        output = model(input_ids, attention_mask=torch.zeros_like(input_ids), labels=input_ids)
        assert torch.isfinite(output.aux_loss), router_type
