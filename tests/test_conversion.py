"""Weight conversions (`remoe.conversion`): BTX mix, sparse upcycling, dense and Mixtral conversion, checked against
the source models' logits."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import remoe
from remoe import conversion
from remoe.modeling_remoe import ReMoERouter

from .conftest import TINY_ARCH

TINY = dict(
    vocab_size=100,
    **TINY_ARCH,
    initializer_range=0.2,  # large weights: every part of the network visibly changes the logits
)
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def randomize_ffns(model, std: float = 0.2):
    with torch.no_grad():
        for layer in model.model.layers:
            for name in FFN_NAMES:
                getattr(layer.mlp, name).weight.normal_(0, std)
    return model


def sources_sharing_non_ffn(tmp_path, count: int):
    """`count` Llama checkpoints with identical attention/norms/embeddings and different FFNs."""
    base = llama()
    paths, models = [], []
    for index in range(count):
        model = randomize_ffns(llama()) if index else base
        if index:
            state = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
            model.load_state_dict(state, strict=False)
        model.save_pretrained(tmp_path / f"src{index}")
        paths.append(tmp_path / f"src{index}")
        models.append(model)
    return paths, models


def input_ids():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids(), use_cache=False).logits


def force_gates(monkeypatch, make_gates):
    """Replace every router's gates with `make_gates(num_tokens, num_experts)`."""

    def forward(self, hidden_states):
        router_logits = torch.nn.functional.linear(hidden_states, self.weight)
        return router_logits, make_gates(*router_logits.shape).to(hidden_states.dtype)

    monkeypatch.setattr(ReMoERouter, "forward", forward)


def load(path) -> remoe.ReMoEForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model) is remoe.ReMoEForCausalLM
    return model


def read_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


def test_mix_with_one_hot_gates_gives_each_source(tmp_path, monkeypatch):
    paths, models = sources_sharing_non_ffn(tmp_path, 3)
    out = conversion.btx_mix(paths, tmp_path / "mixed", router_type="relu", num_experts_per_tok=1)
    for name in ("modeling_remoe.py", "configuration_remoe.py", "config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_remoe.ReMoEForCausalLM"
    info = json.loads((out / conversion.CONVERSION_INFO_FILE).read_text())
    assert [expert["name"] for expert in info["experts"]] == ["src0", "src1", "src2"]

    mixed = load(out)
    assert mixed.config.router_type == "relu" and mixed.config.num_experts == 3
    assert mixed.l1_coef == pytest.approx(mixed.config.l1_coef_init)
    reference = [logits(model) for model in models]
    assert (reference[0] - reference[1]).abs().max() > 1e-2  # the experts really differ
    for expert in range(3):
        force_gates(monkeypatch, lambda t, e, i=expert: torch.nn.functional.one_hot(torch.full((t,), i), e).float())
        torch.testing.assert_close(logits(mixed), reference[expert], rtol=0, atol=1e-5)


def test_mix_averages_the_shared_weights_and_copies_the_ffns(tmp_path):
    paths = []
    for index in range(3):
        llama().save_pretrained(tmp_path / f"src{index}")
        paths.append(tmp_path / f"src{index}")
    sources = [read_tensors(path) for path in paths]
    mixed = read_tensors(conversion.btx_mix(paths, tmp_path / "avg", router_type="topk"))
    shared = [name for name in sources[0] if ".mlp." not in name]
    assert len(shared) == 2 * 6 + 3
    for name in shared:
        expected = torch.stack([source[name] for source in sources]).mean(dim=0)
        assert not torch.equal(sources[0][name], sources[1][name]) or "norm" in name
        torch.testing.assert_close(mixed[name], expected, rtol=0, atol=1e-7)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        for expert, source in enumerate(sources):
            gate_up = torch.cat([source[f"{prefix}gate_proj.weight"], source[f"{prefix}up_proj.weight"]])
            assert torch.equal(mixed[f"{prefix}experts.gate_up_proj"][expert], gate_up)
            assert torch.equal(mixed[f"{prefix}experts.down_proj"][expert], source[f"{prefix}down_proj.weight"])

    # shared="base" copies the seed, which also joins as the last (generalist) expert
    base = read_tensors(
        conversion.btx_mix(paths[1:], tmp_path / "base", seed_model=paths[0], seed_as_expert=True, shared="base")
    )
    for name in shared:
        assert torch.equal(base[name], sources[0][name]), name
    assert torch.equal(
        base["model.layers.0.mlp.experts.down_proj"][2], sources[0]["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.parametrize("split", [2, 4])
def test_mix_split_with_all_chunks_active_reproduces_the_source_ffn(tmp_path, monkeypatch, split):
    paths, models = sources_sharing_non_ffn(tmp_path, 2)
    mixed = load(conversion.btx_mix(paths, tmp_path / "split", split=split, num_experts_per_tok=1))
    assert mixed.config.num_routed_experts == 2 * split
    assert mixed.config.expert_intermediate_size == TINY["intermediate_size"] // split
    for expert, model in enumerate(models):
        chunks = torch.zeros(2 * split)
        chunks[expert * split : (expert + 1) * split] = 1.0
        force_gates(monkeypatch, lambda t, e, c=chunks: c.expand(t, e))
        torch.testing.assert_close(logits(mixed), logits(model), rtol=0, atol=1e-5)


def test_blended_mix_gives_every_expert_a_chunk_of_every_source(tmp_path, monkeypatch):
    """BTX's blending-experts ablation: expert j = chunk j of each source's FFN, so all-ones gates compute the sum of
    the sources' FFNs (as the unblended mix does) while no single expert is any source's FFN."""
    paths, models = sources_sharing_non_ffn(tmp_path, 2)
    blend_dir = conversion.btx_mix(paths, tmp_path / "blend", blend=True, num_experts_per_tok=1)
    info = json.loads((blend_dir / conversion.CONVERSION_INFO_FILE).read_text())
    assert info["blend"] is True and [expert["name"] for expert in info["experts"]] == ["blend-0", "blend-1"]
    mixed, sources = read_tensors(blend_dir), [read_tensors(path) for path in paths]
    half = TINY["intermediate_size"] // 2
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp."
        for expert in range(2):
            rows = slice(expert * half, (expert + 1) * half)
            gate = torch.cat([source[f"{prefix}gate_proj.weight"][rows] for source in sources])
            up = torch.cat([source[f"{prefix}up_proj.weight"][rows] for source in sources])
            down = torch.cat([source[f"{prefix}down_proj.weight"][:, rows] for source in sources], dim=1)
            assert torch.equal(mixed[f"{prefix}experts.gate_up_proj"][expert], torch.cat([gate, up]))
            assert torch.equal(mixed[f"{prefix}experts.down_proj"][expert], down)

    blend, plain = load(blend_dir), load(conversion.btx_mix(paths, tmp_path / "plain", num_experts_per_tok=1))
    force_gates(monkeypatch, lambda t, e: torch.ones(t, e))
    torch.testing.assert_close(logits(blend), logits(plain), rtol=0, atol=1e-5)
    force_gates(monkeypatch, lambda t, e: torch.nn.functional.one_hot(torch.zeros(t, dtype=torch.long), e).float())
    for model in models:
        assert (logits(blend) - logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("count", "options", "message"),
    [
        (3, {}, "blend needs the number of experts (3) to divide the FFN width 64"),
        (2, {"router_init": "centroid", "router_texts": [["a"], ["b"]]}, "router_init='centroid'"),
        (2, {"blend": "yes"}, "blend (--blend) must be True or False"),
    ],
)
def test_blend_bad_options_fail_before_writing(tmp_path, count, options, message):
    paths, _ = sources_sharing_non_ffn(tmp_path, count)
    with pytest.raises(ValueError, match=re.escape(message)):
        conversion.btx_mix(paths, tmp_path / "out", **{"blend": True, **options})
    assert not (tmp_path / "out").exists()


def test_upcycle_copies_with_gates_summing_to_one_equal_the_dense_model(tmp_path, monkeypatch):
    dense = llama()
    dense.save_pretrained(tmp_path / "dense")
    copies = load(conversion.upcycle(tmp_path / "dense", tmp_path / "copy", num_experts=4, granularity=2))
    assert copies.config.num_routed_experts == 8 and copies.config.intermediate_size == TINY["intermediate_size"]
    force_gates(monkeypatch, lambda t, e: torch.full((t, e), 1 / 4))  # each chunk: 4 copies with gate 1/4
    torch.testing.assert_close(logits(copies), logits(dense), rtol=0, atol=1e-5)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4]).repeat_interleave(2)  # any gates summing to 1 over the copies
    force_gates(monkeypatch, lambda t, e: weights.expand(t, e))
    torch.testing.assert_close(logits(copies), logits(dense), rtol=0, atol=1e-5)

    split = load(conversion.upcycle(tmp_path / "dense", tmp_path / "split", num_experts=4, mode="split"))
    assert split.config.intermediate_size == TINY["intermediate_size"] // 4
    force_gates(monkeypatch, lambda t, e: torch.ones(t, e))
    torch.testing.assert_close(logits(split), logits(dense), rtol=0, atol=1e-5)

    noisy = read_tensors(conversion.upcycle(tmp_path / "dense", tmp_path / "noisy", num_experts=2, noise=0.1))
    experts = noisy["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])
    source = torch.cat([dense.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.up_proj.weight])
    relative = (experts[0] - source).std() / source.std()
    assert 0.05 < relative < 0.2


def mixtral(num_experts: int, top_k: int) -> MixtralForCausalLM:
    config = MixtralConfig(**TINY, num_local_experts=num_experts, num_experts_per_tok=top_k, tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def save_fused_mixtral(model: MixtralForCausalLM, path) -> None:
    """The Transformers v5 in-memory layout on disk (`mlp.gate`, `mlp.experts.gate_up_proj`)."""
    from safetensors.torch import save_file

    path.mkdir()
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_convert_mixtral_topk_keeps_the_logits(tmp_path, layout):
    source = mixtral(num_experts=4, top_k=4)  # k == E: Mixtral's renormalisation is a no-op
    if layout == "original":
        source.save_pretrained(tmp_path / "mixtral")
    else:
        save_fused_mixtral(source, tmp_path / "mixtral")
    converted = load(conversion.convert(tmp_path / "mixtral", tmp_path / "remoe", router_type="topk"))
    assert converted.config.router_type == "topk" and converted.config.num_experts_per_tok == 4
    torch.testing.assert_close(logits(converted), logits(source), rtol=0, atol=1e-5)


def test_convert_mixtral_top2_of_4_keeps_the_logits(tmp_path):
    source = mixtral(num_experts=4, top_k=2)
    source.save_pretrained(tmp_path / "mixtral")
    converted = load(conversion.convert(tmp_path / "mixtral", tmp_path / "remoe", router_type="topk"))
    torch.testing.assert_close(logits(converted), logits(source), rtol=0, atol=1e-5)


def test_converting_a_converted_topk_model_again_keeps_its_routing(tmp_path):
    """A ReMoE TopK model made from Mixtral keeps `router_renormalize` (and its logits) through a second conversion."""
    source = mixtral(num_experts=4, top_k=2)
    source.save_pretrained(tmp_path / "mixtral")
    conversion.convert(tmp_path / "mixtral", tmp_path / "remoe", router_type="topk")
    again = load(conversion.convert(tmp_path / "remoe", tmp_path / "again", router_type="topk"))
    assert again.config.router_renormalize and again.config.router_aux_loss_coef == source.config.router_aux_loss_coef
    torch.testing.assert_close(logits(again), logits(source), rtol=0, atol=1e-5)


def test_convert_mixtral_to_relu_reuses_the_centered_router(tmp_path):
    source = mixtral(num_experts=4, top_k=2)
    source.save_pretrained(tmp_path / "mixtral")
    converted = load(conversion.convert(tmp_path / "mixtral", tmp_path / "relu"))
    assert converted.config.router_type == "relu" and converted.config.target_sparsity == 0.5
    for layer_src, layer_out in zip(source.model.layers, converted.model.layers, strict=True):
        router = layer_src.mlp.gate.weight
        torch.testing.assert_close(layer_out.mlp.router.weight, router - router.mean(0, keepdim=True))
        assert torch.equal(layer_out.mlp.experts.gate_up_proj, layer_src.mlp.experts.gate_up_proj)
        assert torch.equal(layer_out.mlp.experts.down_proj, layer_src.mlp.experts.down_proj)
        assert torch.equal(layer_out.self_attn.q_proj.weight, layer_src.self_attn.q_proj.weight)


def test_convert_remoe_topk_to_relu(tmp_path, make_config):
    source = remoe.ReMoEForCausalLM(make_config(router_type="topk", granularity=2, moe_layer_freq=2)).eval()
    source.save_pretrained(tmp_path / "topk")
    converted = load(conversion.convert(tmp_path / "topk", tmp_path / "relu"))
    assert converted.config.router_type == "relu" and converted.config.granularity == 2
    before, after = source.state_dict(), converted.state_dict()
    for name, tensor in before.items():
        if name.endswith("router.weight"):
            torch.testing.assert_close(after[name], tensor - tensor.mean(0, keepdim=True))
        elif name != "controller.l1_coef":
            assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize(
    ("make_model", "sharded"),
    [
        (lambda: llama(attention_bias=True), False),
        (lambda: llama(tie_word_embeddings=True), True),
        (lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)).eval(), False),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)).eval(), True),
    ],
    ids=["llama-bias", "llama-tied", "mistral", "qwen2"],
)
def test_dense_sources_convert_to_an_equivalent_dense_remoe(tmp_path, make_model, sharded):
    source = make_model()
    source.save_pretrained(tmp_path / "src")
    out = conversion.convert(tmp_path / "src", tmp_path / "dense", max_shard_size=20_000 if sharded else "5GB")
    assert (out / "model.safetensors.index.json").is_file() == sharded
    converted = load(out)
    assert converted.config.router_type == "dense" and converted.controller is None
    torch.testing.assert_close(logits(converted), logits(source), rtol=0, atol=1e-5)


def test_qwen2_sources_mix_with_their_q_k_v_biases(tmp_path, monkeypatch):
    paths, models = [], []
    base = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    for index in range(2):
        model = base if index == 0 else randomize_ffns(Qwen2ForCausalLM(Qwen2Config(**TINY)).eval())
        if index:
            model.load_state_dict({k: v for k, v in base.state_dict().items() if ".mlp." not in k}, strict=False)
        model.save_pretrained(tmp_path / f"q{index}")
        paths.append(tmp_path / f"q{index}")
        models.append(model)
    mixed = load(conversion.btx_mix(paths, tmp_path / "mixed", num_experts_per_tok=1))
    force_gates(monkeypatch, lambda t, e: torch.nn.functional.one_hot(torch.full((t,), 1), e).float())
    torch.testing.assert_close(logits(mixed), logits(models[1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("make_other", "field"),
    [
        (lambda: llama(hidden_size=64), "hidden_size"),
        (lambda: llama(vocab_size=120), "vocab_size"),
        (lambda: llama(num_hidden_layers=3), "num_hidden_layers"),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)), "model_type"),
        (lambda: llama(intermediate_size=96), "ffn_size"),
    ],
)
def test_mismatched_sources_fail_before_writing(tmp_path, make_other, field):
    llama().save_pretrained(tmp_path / "a")
    make_other().save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=field):
        conversion.btx_mix([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no output, no temporary folder


def test_bad_sources_and_options_fail_before_writing(tmp_path):
    llama().save_pretrained(tmp_path / "a")
    llama().save_pretrained(tmp_path / "b")
    mixtral(4, 2).save_pretrained(tmp_path / "moe")
    qwen3 = Qwen3MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    Qwen3MoeForCausalLM(qwen3).save_pretrained(tmp_path / "qwen3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    out = tmp_path / "out"
    pairs = [tmp_path / "a", tmp_path / "b"]
    cases = [
        (lambda: conversion.btx_mix([tmp_path / "a", tmp_path / "moe"], out), "MoE checkpoint"),
        (lambda: conversion.btx_mix([tmp_path / "a", tmp_path / "empty"], out), "config.json"),
        (lambda: conversion.btx_mix([tmp_path / "a"], out), "at least 2 experts"),
        (lambda: conversion.btx_mix(pairs, out, router_type="sigmoid"), "router_type"),
        (lambda: conversion.btx_mix(pairs, out, split=3), "split=3"),
        (lambda: conversion.btx_mix(pairs, out, num_experts_per_tok=3), "num_experts_per_tok"),
        (lambda: conversion.btx_mix(pairs, out, router_init="centroid"), "router_texts"),
        (lambda: conversion.btx_mix(pairs, out, shared="median"), "shared"),
        (lambda: conversion.btx_mix(pairs, tmp_path / "full"), "not empty"),
        (lambda: conversion.btx_mix(pairs, out, l1_coef_multiplier=0.5), "l1_coef_multiplier"),
        (lambda: conversion.upcycle(tmp_path / "moe", out, num_experts=2), "MoE checkpoint"),
        (lambda: conversion.upcycle(tmp_path / "a", out, num_experts=3, mode="split"), "divide"),
        (lambda: conversion.convert(tmp_path / "qwen3", out), "q_norm"),
        (lambda: conversion.convert(tmp_path / "a", out, router_type="relu"), "upcycle"),
        (lambda: conversion.convert_moe(tmp_path / "moe", tmp_path / "moe"), "one of the sources"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert not out.exists(), message
    assert not list(tmp_path.glob(".*tmp*")), "temporary folders left behind"


def test_centroid_router_activates_each_expert_on_its_own_domain():
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=generator) * 3
    centroids = common + torch.randn(3, 16, generator=generator)
    rows = conversion.centroid_router(centroids)
    own = (rows * centroids).sum(dim=1)
    torch.testing.assert_close(own, torch.ones(3))
    cross = rows @ centroids.T
    assert (cross.diagonal() > cross.masked_fill(torch.eye(3, dtype=torch.bool), -1e9).amax(dim=1)).all()
    with_seed = conversion.centroid_router(centroids, generalist=centroids.mean(0))
    assert with_seed.shape == (4, 16)
    torch.testing.assert_close(with_seed[-1] @ centroids.mean(0), torch.tensor(0.5))


def test_parse_size():
    assert conversion.parse_size("5GB") == 5_000_000_000
    assert conversion.parse_size("2MiB") == 2 * 1024**2
    assert conversion.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        conversion.parse_size("lots")


# ---- BTX's router: SoftMax(TopK(Wx)), renormalised over the kept experts ---------------------------------------------


def top2_gate_sums(model) -> torch.Tensor:
    """The sum of every token's gates in the first MoE layer."""
    sums = []
    hook = model.model.layers[0].mlp.router.register_forward_hook(lambda m, a, out: sums.append(out[1].sum(-1)))
    logits(model)
    hook.remove()
    return sums[0]


def test_mix_of_identical_sources_with_renormalised_top2_is_the_source(tmp_path):
    source = randomize_ffns(llama())
    paths = []
    for index in range(3):
        source.save_pretrained(tmp_path / f"same{index}")
        paths.append(tmp_path / f"same{index}")
    mixed = load(conversion.btx_mix(paths, tmp_path / "mixed", router_type="topk", num_experts_per_tok=2))
    assert mixed.config.router_renormalize and not mixed.config.router_sampling  # the default for BTX
    torch.testing.assert_close(top2_gate_sums(mixed), torch.ones(24), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(mixed), logits(source), rtol=0, atol=1e-5)

    # --no_router_renormalize: the old behaviour, softmax values of the top 2 of 3 (summing to less than 1).
    old = load(conversion.btx_mix(paths, tmp_path / "old", router_type="topk", router_renormalize=False))
    assert not old.config.router_renormalize
    assert (top2_gate_sums(old) < 0.99).all()
    assert (logits(old) - logits(source)).abs().max() > 1e-3


def test_upcycled_copies_with_renormalised_topk_equal_the_dense_source_at_init(tmp_path):
    dense = randomize_ffns(llama())
    dense.save_pretrained(tmp_path / "dense")
    upcycled = load(
        conversion.upcycle(
            tmp_path / "dense", tmp_path / "up", num_experts=4, num_experts_per_tok=2, router_type="topk"
        )
    )
    assert upcycled.config.router_renormalize
    torch.testing.assert_close(logits(upcycled), logits(dense), rtol=0, atol=1e-5)
    old = load(
        conversion.upcycle(
            tmp_path / "dense",
            tmp_path / "old",
            num_experts=4,
            num_experts_per_tok=2,
            router_type="topk",
            router_renormalize=False,
        )
    )
    assert (logits(old) - logits(dense)).abs().max() > 1e-3
    sampled = load(
        conversion.upcycle(
            tmp_path / "dense", tmp_path / "sampled", num_experts=4, router_type="topk", router_sampling=True
        )
    )
    assert sampled.config.router_sampling and sampled.config.router_renormalize
    torch.testing.assert_close(logits(sampled), logits(dense), rtol=0, atol=1e-5)  # inference: deterministic top-1


def test_convert_topk_routing_defaults_and_overrides(tmp_path, make_config):
    mixtral(num_experts=4, top_k=2).save_pretrained(tmp_path / "mixtral")
    assert load(conversion.convert(tmp_path / "mixtral", tmp_path / "a", router_type="topk")).config.router_renormalize
    plain = conversion.convert(tmp_path / "mixtral", tmp_path / "b", router_type="topk", router_renormalize=False)
    assert not load(plain).config.router_renormalize
    # A ReMoE TopK source keeps its own routing unless told otherwise.
    kept = load(conversion.convert(plain, tmp_path / "c", router_type="topk"))
    assert not kept.config.router_renormalize and not kept.config.router_sampling
    sampled = load(conversion.convert(plain, tmp_path / "d", router_type="topk", router_sampling=True))
    assert sampled.config.router_sampling and not sampled.config.router_renormalize
    relu = remoe.ReMoEForCausalLM(make_config(router_type="relu")).eval()
    relu.save_pretrained(tmp_path / "relu")
    assert load(conversion.convert(tmp_path / "relu", tmp_path / "e", router_type="topk")).config.router_renormalize


def test_topk_routing_options_are_checked(tmp_path):
    llama().save_pretrained(tmp_path / "a")
    llama().save_pretrained(tmp_path / "b")
    mixtral(4, 2).save_pretrained(tmp_path / "moe")
    out, pairs = tmp_path / "out", [tmp_path / "a", tmp_path / "b"]
    cases = [
        (lambda: conversion.btx_mix(pairs, out, router_type="relu", router_renormalize=True), "--router_renormalize"),
        (lambda: conversion.btx_mix(pairs, out, router_type="relu", router_sampling=True), "--router_sampling"),
        (lambda: conversion.btx_mix(pairs, out, router_type="topk", router_renormalize="yes"), "True or False"),
        (lambda: conversion.upcycle(tmp_path / "a", out, num_experts=2, router_sampling=True), "'topk' only"),
        (lambda: conversion.convert(tmp_path / "moe", out, router_renormalize=True), "--router_renormalize"),
        (lambda: conversion.convert(tmp_path / "a", out, router_renormalize=True), "MoE sources only"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert not out.exists(), message


def test_constant_top1_gates_are_warned_about(tmp_path, caplog):
    llama().save_pretrained(tmp_path / "dense")
    with caplog.at_level("WARNING"):
        conversion.upcycle(tmp_path / "dense", tmp_path / "top1", num_experts=2, router_type="topk")
    assert "every gate is 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        conversion.upcycle(tmp_path / "dense", tmp_path / "s1", num_experts=2, router_type="topk", router_sampling=True)
    assert "every gate is 1" not in caplog.text
