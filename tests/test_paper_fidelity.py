"""The papers' conventions: the TopK baseline's balancing loss, BTX's sampled router, the recipe's init and padding,
the two loss terms apart in the logs, traps that would train the router silently wrong, TopK's near-dense warmup and
the granularity sweep."""

import dataclasses
import json
import logging
import math

import pytest
import torch
import yaml
from transformers import TrainingArguments

import remoe
from remoe.modeling_remoe import switch_load_balancing_loss
from remoe.training.cli import main
from tests.conftest import tiny_config
from tests.test_train_cli import SMALL_RUN


def _batch(config, batch_size: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch_size, length))


def test_topk_balancing_loss_is_a_sum_over_layers_by_default():
    """Megatron adds `coef * aux_l` for every MoE layer; the ReMoE paper's TopK baseline is trained that way."""
    config = tiny_config(router_type="topk", num_hidden_layers=3)
    assert config.router_aux_loss_reduction == "sum"
    model = remoe.ReMoEForCausalLM(config).train()
    input_ids = _batch(config)
    output = model(input_ids, labels=input_ids, output_router_logits=True)
    per_layer = [switch_load_balancing_loss((logits,), config.routed_top_k) for logits in output.router_logits]
    assert output.aux_loss.item() == pytest.approx(sum(loss.item() for loss in per_layer), rel=1e-6)
    assert output.aux_loss.item() == pytest.approx(3 * switch_load_balancing_loss(output.router_logits, 1).item())

    mean_model = remoe.ReMoEForCausalLM(
        tiny_config(router_type="topk", num_hidden_layers=3, router_aux_loss_reduction="mean")
    )
    mean_model.load_state_dict(model.state_dict())
    mean_output = mean_model.train()(input_ids, labels=input_ids, output_router_logits=True)
    assert mean_output.aux_loss.item() == pytest.approx(output.aux_loss.item() / 3, rel=1e-6)
    with pytest.raises(ValueError, match="router_aux_loss_reduction"):
        tiny_config(router_type="topk", router_aux_loss_reduction="max")


def test_sampled_topk_router_samples_in_training_and_is_deterministic_at_inference():
    """BTX's "sample top-1": experts drawn from the router softmax in training (straight-through gates), top-k at
    inference."""
    config = tiny_config(router_type="topk", num_experts=4, router_sampling=True, router_renormalize=True)
    router = remoe.ReMoEForCausalLM(config).model.layers[0].mlp.router
    hidden = torch.randn(512, config.hidden_size)
    router.eval()
    _, gates = router(hidden)
    logits = hidden @ router.weight.t()
    assert torch.equal(gates.argmax(-1), logits.argmax(-1))
    router.train()
    torch.manual_seed(1)
    logits, gates = router(hidden)
    chosen = (gates > 0).float().argmax(-1)
    assert (chosen != logits.argmax(-1)).float().mean() > 0.05  # sampled, not the argmax
    assert torch.allclose(gates.sum(-1), torch.ones(len(hidden)))  # renormalised top-1: gate 1
    # Sampling follows the softmax: the empirical frequencies match the mean probabilities.
    torch.manual_seed(2)
    many = torch.randn(8, config.hidden_size).repeat_interleave(2000, dim=0)
    frequencies = (router(many)[1] > 0).float().view(8, 2000, -1).mean(1)
    probabilities = torch.softmax(many[::2000] @ router.weight.t(), -1)
    assert torch.allclose(frequencies, probabilities.detach(), atol=0.05)
    # Straight-through: the router gets a gradient although the forward gate is exactly 1.
    (gates * torch.randn_like(gates)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="router_sampling"):
        tiny_config(router_type="relu", router_sampling=True)


def test_scaled_output_init_and_no_padding_row():
    layers = 4
    config = tiny_config(
        num_hidden_layers=layers, hidden_size=64, initializer_range=0.02, scaled_output_init=True, moe_layer_freq=2
    )
    config.pad_token_id = config.eos_token_id = 3
    model = remoe.ReMoEForCausalLM(config)
    expected = 0.02 / math.sqrt(2 * layers)
    for name, parameter in model.named_parameters():
        if name.endswith(("o_proj.weight", "mlp.down_proj.weight", "experts.down_proj")):
            assert parameter.std().item() == pytest.approx(expected, rel=0.15), name
        elif name.endswith(("q_proj.weight", "experts.gate_up_proj", "mlp.up_proj.weight")):
            assert parameter.std().item() == pytest.approx(0.02, rel=0.15), name
    plain = remoe.ReMoEForCausalLM(tiny_config(num_hidden_layers=layers, initializer_range=0.02))
    assert plain.model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)

    # pad = eos (GPT-2 style): the end-of-text embedding is initialised and trained like every other row.
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx is None and embedding.weight[3].abs().sum() > 0
    input_ids = torch.full((1, 8), 3)
    model.train()(input_ids, labels=input_ids).loss.backward()
    assert embedding.weight.grad[3].abs().sum() > 0


def _enable_checkpointing(model, use_reentrant: bool) -> None:
    """Transformers 5.23 renamed `gradient_checkpointing_enable`; the old name stays for older releases."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@pytest.mark.parametrize("router_type", ["relu", "topk", "sparsemixer"])
def test_activation_checkpointing_gives_the_loss_and_gradients_of_none(router_type):
    """Reentrant and non-reentrant checkpointing: the loss (regulariser or balancing loss included) and every
    gradient equal those without checkpointing, and the router loss alone has a gradient for the router (reentrant
    recomputation used to leave it without one). The batch is padded: the layers' terms leave padding out, as the
    loss does."""
    torch.manual_seed(0)
    model = remoe.ReMoEForCausalLM(tiny_config(router_type=router_type)).train()
    input_ids = _batch(model.config)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    router = model.model.layers[0].mlp.router.weight
    results = {}
    for use_reentrant in (None, False, True):
        if use_reentrant is not None:
            _enable_checkpointing(model, use_reentrant)
        model.zero_grad()
        model(input_ids, attention_mask=attention_mask, labels=input_ids).aux_loss.backward()
        assert router.grad.abs().sum() > 0, use_reentrant
        model.zero_grad()
        torch.manual_seed(1)  # SparseMixer samples
        output = model(input_ids, attention_mask=attention_mask, labels=input_ids)
        output.loss.backward()
        results[use_reentrant] = output.loss.detach(), output.aux_loss.detach(), [p.grad for p in model.parameters()]
    for use_reentrant in (False, True):
        loss, aux_loss, grads = results[use_reentrant]
        assert torch.equal(loss, results[None][0]) and torch.equal(aux_loss, results[None][1])
        for grad, reference in zip(grads, results[None][2], strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)


def test_router_losses_are_each_moe_layers_term_over_its_real_tokens():
    """`ReMoEModel(..., router_loss=True)`: one term per MoE layer (dense layers give none), each equal to
    `l1_layer_loss` of that layer's captured router logits without the padded rows; without it, none."""
    from remoe.modeling_remoe import l1_layer_loss

    model = remoe.ReMoEForCausalLM(tiny_config(num_hidden_layers=4, moe_layer_freq=2)).train()
    input_ids = _batch(model.config)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    outputs = model.model(input_ids, attention_mask=attention_mask, output_router_logits=True, router_loss=True)
    assert len(outputs.router_losses) == len(outputs.router_logits) == model.config.num_moe_layers == 2
    real = attention_mask.reshape(-1).bool()
    for term, logits in zip(outputs.router_losses, outputs.router_logits, strict=True):
        expected = l1_layer_loss(logits[real], model.config.routed_top_k, model.config.load_balance)
        assert term.requires_grad and torch.equal(term, expected)
    assert model.model(input_ids, attention_mask=attention_mask).router_losses is None


# Transformers 5.24 renamed the training arguments to `activation_checkpointing[_kwargs]`; the old names are aliases.
CHECKPOINTING_ARGUMENTS = [
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {field.name for field in dataclasses.fields(TrainingArguments)}
]


@pytest.mark.parametrize("name", CHECKPOINTING_ARGUMENTS)
def test_remoe_train_with_reentrant_checkpointing_trains_the_router_with_the_regulariser(tmp_path, name):
    run = {**SMALL_RUN, "training": {**SMALL_RUN["training"], name: True, f"{name}_kwargs": {"use_reentrant": True}}}
    path = tmp_path / "reentrant.yaml"
    path.write_text(yaml.safe_dump(run))
    output = tmp_path / "out"
    assert main(["train", "--config", str(path), "--output_dir", str(output), "--logging_steps", "1"]) == 0
    history = [entry for entry in json.loads((output / "log_history.json").read_text()) if "loss" in entry]
    assert history and all(entry["remoe/loss_reg"] > 0 for entry in history)


def test_logs_hold_the_lm_loss_and_the_weighted_regulariser_apart():
    model = remoe.ReMoEForCausalLM(tiny_config(l1_coef_init=0.5)).train()
    input_ids = _batch(model.config)
    output = model(input_ids, labels=input_ids)
    metrics = model.update_l1_coef()
    assert metrics["remoe/loss_lm"] + metrics["remoe/loss_reg"] == pytest.approx(output.loss.item(), rel=1e-5)
    assert metrics["remoe/loss_reg"] == pytest.approx(0.5 * output.aux_loss.item(), rel=1e-5)
    model(input_ids)  # no labels: routing statistics only
    assert "remoe/loss_lm" not in model.update_l1_coef()


def test_continuing_a_bf16_checkpoint_trains_fp32_master_weights(tmp_path, caplog):
    from remoe.training.run_config import plan_run, resolve_run
    from remoe.training.train import build_model

    checkpoint = tmp_path / "bf16"
    remoe.ReMoEForCausalLM(tiny_config(max_position_embeddings=128)).to(torch.bfloat16).save_pretrained(checkpoint)
    base = {"config": None, "preset": "tiny", "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "o")}
    model = build_model(plan_run(base), tokenizer=None)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    kept = build_model(plan_run({**base, "model_dtype": "auto"}), tokenizer=None)
    assert {parameter.dtype for parameter in kept.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="--model_dtype"):
        plan_run({"preset": "tiny", "model_dtype": "bfloat16", "output_dir": str(tmp_path / "p")})
    with caplog.at_level(logging.WARNING):
        resolve_run({"preset": "182m"})
    assert "built-in corpus" in caplog.text


def test_topk_near_dense_warmup_routes_k_experts_then_the_configs(tmp_path):
    run = {**SMALL_RUN, "model": {**SMALL_RUN["model"], "router_type": "topk"}}
    path = tmp_path / "topk.yaml"
    path.write_text(yaml.safe_dump(run))
    output = tmp_path / "warm"
    flags = ["--topk_warmup_k", "3", "--topk_warmup_steps", "4", "--logging_steps", "1", "--save_steps", "100"]
    assert main(["train", "--config", str(path), *flags, "--output_dir", str(output)]) == 0
    history = [entry for entry in json.loads((output / "log_history.json").read_text()) if "loss" in entry]
    experts = [entry["remoe/experts_per_token"] for entry in history]
    assert experts[:4] == pytest.approx([3.0] * 4) and experts[4:] == pytest.approx([1.0] * (len(experts) - 4))
    assert yaml.safe_load((output / "run_config.yaml").read_text())["training"]["topk_warmup_k"] == 3
    saved = remoe.ReMoEConfig.from_pretrained(output)
    assert saved.num_experts_per_tok == 1  # the warmup is training only

    model = remoe.ReMoEForCausalLM(tiny_config(router_type="topk"))
    with pytest.raises(ValueError, match="top_k must be between"):
        model.set_routed_top_k(5)
    assert main(["train", "--config", str(path), "--topk_warmup_k", "3", "--output_dir", str(tmp_path / "x")]) == 2
    relu = tmp_path / "relu.yaml"
    relu.write_text(yaml.safe_dump(SMALL_RUN))
    assert main(["train", "--config", str(relu), *flags, "--output_dir", str(tmp_path / "y")]) == 2


def test_compare_sweeps_granularity(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_RUN))
    output = tmp_path / "compare"
    args = ["compare", "--config", str(path), "--router_types", "dense", "topk", "--granularities", "1", "2"]
    assert main([*args, "--seeds", "0", "--max_steps", "2", "--output_dir", str(output)]) == 0
    summary = json.loads((output / "compare.json").read_text())
    rows = {(row["router_type"], row["granularity"]): row for row in summary["runs"]}
    assert set(rows) == {("dense", None), ("topk", 1), ("topk", 2)}
    config = remoe.ReMoEConfig.from_pretrained(output / "topk-E8-G2-seed0")  # compare's default E = 8
    assert config.granularity == 2 and config.num_routed_experts == 16 and config.routed_top_k == 2
    # The same active expert width; the router has E*G rows (2 layers x 8 more rows x hidden 32).
    assert rows[("topk", 2)]["active_parameters"] - rows[("topk", 1)]["active_parameters"] == 2 * 8 * 32
    assert "topk G=2" in (output / "compare.md").read_text()
    assert (output / "granularity_scaling.png").stat().st_size > 100


def test_every_router_flag_of_remoe_train_reaches_the_model_config():
    from remoe.training.run_config import resolve_run

    flags = {
        "router_type": "topk",
        "router_aux_loss_coef": 0.05,
        "router_aux_loss_reduction": "mean",
        "router_renormalize": True,
        "router_sampling": True,
    }
    run = resolve_run({"preset": "tiny", **flags})
    assert {name: run["model"][name] for name in flags} == flags


@pytest.mark.parametrize("router_type", ["relu", "topk"])
def test_label_smoothing_is_refused_where_it_would_drop_the_router_loss(tmp_path, capsys, router_type):
    """With `label_smoothing_factor`, Trainer computes the loss from the logits: the regulariser / balancing loss, part
    of the model's own loss, would silently stop training the router."""
    model = {**SMALL_RUN["model"], "router_type": router_type}
    run = {**SMALL_RUN, "model": model, "training": {**SMALL_RUN["training"], "label_smoothing_factor": 0.1}}
    path = tmp_path / "smoothing.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["train", "--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "training.label_smoothing_factor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
