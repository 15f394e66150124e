"""The Transformers conventions that generic tooling relies on, on every supported Transformers release.

The KV cache argument (`cache` since Transformers 5.24, `past_key_values` before), static-cache and compiled
generation, meta-device initialisation, fp32 placement of lambda, and the experts implementations by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock, patch

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.generation import CompileConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from remoe import ReMoEForCausalLM
from remoe.configuration_remoe import experts_are_tensor_parallel
from remoe.modeling_remoe import CACHE_NAME

from .parallel_plan_worker import supports_expert_parallel_size

ROUTER_TYPES = ("relu", "topk", "dense")
CPU_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _model(make_config, router_type: str, **overrides) -> ReMoEForCausalLM:
    """A tiny model with large weights, so that ReLU routing sends tokens to 0..E experts and greedy decoding is not
    dominated by one token."""
    torch.manual_seed(0)
    model = ReMoEForCausalLM(make_config(router_type=router_type, pad_token_id=0, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.3)
    return model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prompt(batch: int = 2, length: int = 5, vocab: int = 97) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def test_cache_name_follows_the_installed_release():
    fields = {field.name for field in dataclasses.fields(MoeCausalLMOutputWithPast)}
    assert CACHE_NAME in fields
    assert ("cache" if "cache" in fields else "past_key_values") == CACHE_NAME


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_forward_with_the_cache_under_either_name_continues_the_sequence(make_config, router_type):
    """Prefill 6 tokens, then feed token 7 with the cache: the logits equal the full 7-token forward, whether the cache
    is passed as `cache` (Transformers >= 5.24) or as `past_key_values` (its older name)."""
    model = _model(make_config, router_type)
    tokens = _prompt(length=7)
    with torch.no_grad():
        full = model(tokens).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            prefill = model(tokens[:, :-1], use_cache=True, **{name: cache})
            returned = getattr(prefill, CACHE_NAME)
            assert returned is cache and cache.get_seq_length() == 6
            step = model(tokens[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(tokens, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_dynamic_static_and_uncached_generation_agree(make_config, router_type):
    model = _model(make_config, router_type)
    prompt = _prompt()
    kwargs = dict(max_new_tokens=10, do_sample=False)
    dynamic = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(model.generate(prompt, use_cache=False, **kwargs), dynamic)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), dynamic)
    assert len(set(dynamic[:, prompt.shape[1] :].flatten().tolist())) > 2  # a real continuation, not one token


@pytest.mark.parametrize(
    ("router_type", "backend"), [("relu", "eager"), ("topk", "eager"), ("dense", "eager"), ("relu", "inductor")]
)
def test_compiled_generation_with_a_full_graph_equals_dynamic_cache_generation(make_config, router_type, backend):
    """`_can_compile_fullgraph`: the decoding step compiles as one graph (ReLU routing included: its data-dependent
    pair count stays inside the graph) and generates the same tokens as uncompiled dynamic-cache generation."""
    assert ReMoEForCausalLM._can_compile_fullgraph
    model = _model(make_config, router_type)
    prompt = _prompt()
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    compile_config._compile_all_devices = True  # Transformers compiles on accelerators only unless told otherwise
    torch._dynamo.reset()
    compiled = model.generate(
        prompt, max_new_tokens=6, do_sample=False, cache_implementation="static", compile_config=compile_config
    )
    assert hasattr(model, "_compiled_call")  # generation went through the compiled forward
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_meta_device_init_then_materialise(make_config, router_type):
    """The large-model / FSDP path: build on the meta device, `to_empty`, initialise; lambda comes back as lambda_0 in
    fp32 and the model runs."""
    config = make_config(router_type=router_type, l1_coef_init=3e-4)
    with torch.device("meta"):
        model = ReMoEForCausalLM(config)
    assert all(parameter.is_meta for parameter in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    if router_type != "dense":
        assert model.controller.l1_coef.dtype == torch.float32
        assert model.controller.l1_coef.item() == pytest.approx(3e-4)
    logits = model(_prompt()).logits
    assert torch.isfinite(logits).all()


def test_lambda_is_kept_in_fp32_only_where_a_controller_exists(make_config, tmp_path):
    relu, dense = ReMoEForCausalLM(make_config()), ReMoEForCausalLM(make_config(router_type="dense"))
    assert relu._keep_in_fp32_modules_strict == {"controller"}
    assert not dense._keep_in_fp32_modules_strict
    relu.controller.l1_coef.fill_(1.2345678e-6)  # not representable in fp16 / bf16
    relu.save_pretrained(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert loaded.model.embed_tokens.weight.dtype == dtype
        assert loaded.controller.l1_coef.dtype == torch.float32
        assert loaded.controller.l1_coef.item() == relu.controller.l1_coef.item()
        assert loaded.to(torch.float32).to(dtype).controller.l1_coef.item() == relu.controller.l1_coef.item()


@pytest.mark.parametrize("router_type", ["relu", "topk"])
@pytest.mark.parametrize("granularity", [1, 2])
def test_every_experts_implementation_name_runs_transformers_function_and_matches_eager(
    make_config, router_type, granularity
):
    """`batched_mm` and `grouped_mm` are Transformers' own functions (ReLU routes reach them as one row per active
    (token, expert) pair, so no padding is involved), switched by name as generic tooling does; forward and the
    gradients of every parameter match `eager`."""
    model = _model(make_config, router_type, granularity=granularity, num_experts_per_tok=2)
    model.train()
    tokens = _prompt(batch=3, length=8)
    mocks = {name: Mock(wraps=ALL_EXPERTS_FUNCTIONS[name]) for name in CPU_IMPLEMENTATIONS[1:]}
    results = {}
    with patch.dict(ALL_EXPERTS_FUNCTIONS._global_mapping, mocks):
        for name in CPU_IMPLEMENTATIONS:
            model.set_experts_implementation(name)
            assert model.config._experts_implementation == name
            model.zero_grad()
            output = model(tokens, labels=tokens)
            output.loss.backward()
            results[name] = (output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            for mock_name, mock in mocks.items():
                assert mock.called == (mock_name == name), (name, mock_name)
                mock.reset_mock()
    logits, grads = results["eager"]
    for name in CPU_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(results[name][0], logits, rtol=1e-5, atol=1e-5)
        for parameter_name, grad in grads.items():
            # fp32 sums in a different order: one thread vs two moves single elements by ~2e-6
            torch.testing.assert_close(results[name][1][parameter_name], grad, rtol=1e-4, atol=1e-5)


def test_unknown_experts_implementation_names_the_allowed_ones(make_config):
    model = ReMoEForCausalLM(make_config())
    with pytest.raises(ValueError, match="batched_mm"):
        model.set_experts_implementation("megablocks")


def test_transformers_tensor_and_expert_parallel_plans_match_one_process(make_config, tmp_path):
    """Transformers' own parallelism, 2 CPU processes: `DistributedConfig(tp_plan="auto")` shards attention and the
    FFN width (dense FFNs, and the experts where the installed release still shards Mixtral's experts that way),
    `DistributedConfig(ep_size=2)` (Transformers >= 5.19) shards the experts; the
    logits and the greedy continuation with the KV cache (decoding takes the CPU shortcut of ReMoE's `grouped_mm`
    inside Transformers' parallel wrappers) equal one process's for ReLU routes (one row per active pair), TopK routes
    and the dense model."""
    folders = []
    for router_type in ROUTER_TYPES:
        model = _model(make_config, router_type, num_experts_per_tok=2, vocab_size=96)  # lm_head splits in 2
        folder = tmp_path / router_type
        model.save_pretrained(folder)
        input_ids = _prompt(batch=2, length=7, vocab=96)
        with torch.no_grad():
            probe = {"input_ids": input_ids, "logits": model(input_ids).logits}
        probe["generated"] = model.generate(input_ids, max_new_tokens=4, do_sample=False)
        save_file(probe, folder / "probe.safetensors")
        folders.append(str(folder))
    worker = Path(__file__).with_name("parallel_plan_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(_free_port()), str(worker), *folders, str(tmp_path / "results.json")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    expected_layouts = {"tp", "ep"} if supports_expert_parallel_size() else {"tp"}
    expected = {f"{router_type}/{layout}" for router_type in ("relu", "topk") for layout in expected_layouts}
    assert set(results) == expected | {"dense/tp"}  # a dense model has no experts to shard
    assert "moe_tp_experts" not in process.stderr  # no parallel style Transformers deprecates
    for name, result in results.items():
        layout = name.rsplit("/", 1)[1]
        assert result["attention_sharded"], (name, result)  # tensor parallel, or FSDP beside expert parallelism
        if name == "dense/tp" or layout == "ep":
            assert result["ffn_sharded"], (name, result)
        else:
            assert result["ffn_sharded"] is experts_are_tensor_parallel(), (name, result)
        assert result["max_abs_diff"] < 1e-4, (name, result)
        assert result["same_generation"], (name, result)


def test_transformers_name_tables_know_the_base_model_and_the_causal_lm(make_config, tmp_path):
    """`register` reaches the Auto classes only; Transformers' name tables tell a base model from a causal LM. With
    them, `Trainer`'s label smoother treats `ReMoEForCausalLM` as a causal LM (token t predicts label t + 1)."""
    from transformers import Trainer, TrainingArguments
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
    from transformers.trainer_pt_utils import LabelSmoother

    assert MODEL_MAPPING_NAMES["remoe"] == "ReMoEModel"
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["remoe"] == "ReMoEForCausalLM"
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.1, report_to=[])
    model = ReMoEForCausalLM(make_config()).eval()
    trainer = Trainer(model=model, args=args)
    tokens = _prompt(batch=2, length=9)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": tokens, "labels": tokens.clone()})
        logits = model(tokens).logits
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = tokens[:, 1:]
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1).mean()
    smoothed = -log_probs.mean(dim=-1).mean()
    torch.testing.assert_close(loss, 0.9 * nll + 0.1 * smoothed)
    unshifted = LabelSmoother(0.1)({"logits": logits}, tokens)
    assert not torch.allclose(loss, unshifted)
