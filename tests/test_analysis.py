import json

import numpy as np
import pytest
import torch

from remoe import ReMoEForCausalLM
from remoe.training.analysis import analyze, record_routing, summarize
from remoe.training.data import train_tokenizer

from .conftest import tiny_config


def _blocks(num_blocks=6, length=16, vocab=97):
    from datasets import Dataset

    ids = torch.randint(0, vocab, (num_blocks, length), generator=torch.Generator().manual_seed(0)).tolist()
    domains = ["code", "math"] * (num_blocks // 2)
    return Dataset.from_dict({"input_ids": ids, "domain": domains})


def test_relu_summary_matches_the_router_logits():
    model = ReMoEForCausalLM(tiny_config(num_experts=8)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.router.weight[3].zero_()  # ReLU(0) = 0: expert 3 of layer 0 never fires
    blocks = _blocks()
    summary = summarize(record_routing(model, blocks, batch_size=4), model.config)

    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    for layer, layer_logits in enumerate(logits):
        active = (layer_logits > 0).numpy()
        assert summary["layers"][layer]["sparsity"] == pytest.approx(1 - active.mean())
        histogram = np.bincount(active.sum(axis=1), minlength=9)
        assert summary["layers"][layer]["experts_per_token_histogram"] == histogram.tolist()
        math_rows = active.reshape(6, 16, 8)[1::2].reshape(-1, 8)
        expected_share = math_rows.sum(axis=0) / math_rows.sum()
        np.testing.assert_allclose(summary["layers"][layer]["domain_expert_share"]["math"], expected_share)
    assert summary["layers"][0]["dead_experts"] == [3]
    assert summary["num_tokens"] == 96


def test_topk_summary_uses_exactly_k_experts():
    model = ReMoEForCausalLM(tiny_config(num_experts=8, num_experts_per_tok=2, router_type="topk")).eval()
    summary = summarize(record_routing(model, _blocks(), batch_size=4), model.config)
    assert summary["experts_per_token"] == pytest.approx(2.0)
    assert summary["sparsity"] == pytest.approx(0.75)
    assert all(layer["experts_per_token_histogram"][2] == 96 for layer in summary["layers"])


def test_analyze_writes_figures_and_summary(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "The answer is 42.", "Question: 2 + 3?\nAnswer: 5"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = ReMoEForCausalLM(tiny_config(vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    summary = analyze(
        str(tmp_path / "model"),
        str(tmp_path / "out"),
        max_blocks_per_domain=2,
        block_size=32,
        compare_to=str(tmp_path / "model"),
    )
    written = json.loads((tmp_path / "out" / "routing_analysis.json").read_text())
    assert written["sparsity"] == pytest.approx(summary["sparsity"])
    assert written["routing_stability"]["flip_rate"] == 0.0  # a checkpoint against itself
    assert written["routing_stability"]["compare_to"] == str(tmp_path / "model")
    assert written["top_tokens"]["layer"] == 1  # the middle of 2 MoE layers
    assert all(isinstance(entry["token"], str) for entry in written["top_tokens"]["experts"][0])
    assert written["dead_expert_threshold"]["fraction_of_balanced_load"] == 1 / 64
    assert set(written["layers"][0]["domain_expert_share"]) == {"code", "docs", "math"}
    for name in written["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 5_000
    assert len(written["figures"]) == 5


def test_analyze_rejects_a_dense_model(tmp_path):
    ReMoEForCausalLM(tiny_config(router_type="dense")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="router_type"):
        analyze(str(tmp_path), str(tmp_path / "out"))


def test_figures_label_every_layer_and_expert(tmp_path, monkeypatch):
    """Integer layer ticks on the sparsity bars, a tick for each expert on the load and domain x expert maps."""
    import remoe.training.analysis as analysis

    figures = {}

    def keep(fig, path, tight=True):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(analysis, "_save", keep)
    model = ReMoEForCausalLM(tiny_config(num_experts=8, num_hidden_layers=3)).eval()
    recorder = record_routing(model, _blocks(), batch_size=4)
    analysis.plot_figures(recorder, summarize(recorder, model.config), tmp_path)
    assert list(figures["sparsity_per_layer.png"].axes[0].get_xticks()) == [0, 1, 2]
    assert list(figures["expert_load.png"].axes[0].get_xticks()) == list(range(8))
    for axis in figures["domain_expert_heatmap.png"].axes[:3]:
        assert [label.get_text() for label in axis.get_xticklabels()] == [str(expert) for expert in range(8)]


def test_many_experts_get_every_kth_tick():
    import matplotlib.pyplot as plt

    from remoe.training.analysis import _expert_ticks

    fig, axis = plt.subplots()
    _expert_ticks(axis, 64)
    assert list(axis.get_xticks()) == list(range(0, 64, 4))
    plt.close(fig)


def test_dead_experts_are_under_a_64th_of_a_balanced_load():
    from remoe.training.analysis import dead_experts

    # 1280 routed pairs over 4 experts: 320 each under perfect balance, so fewer than 5 tokens is dead
    assert dead_experts(np.array([636, 636, 4, 4])) == [2, 3]
    assert dead_experts(np.array([635, 635, 5, 5])) == []
    assert dead_experts(np.array([1280, 0, 0, 0])) == [1, 2, 3]
    assert dead_experts(np.zeros(4, dtype=np.int64)) == [0, 1, 2, 3]  # a layer that routes nothing


def test_summary_states_the_dead_expert_threshold_and_keeps_experts_with_no_token():
    from remoe.training.analysis import RoutingRecorder

    recorder = RoutingRecorder(num_layers=1, num_experts=4, vocab_size=10, domains=["code"])
    active = np.zeros((1, 640, 4), dtype=bool)
    active[0, :319, 0] = active[0, 319:638, 1] = active[0, 638:640, 2] = True  # expert 2: 2 tokens, expert 3: none
    recorder.add(np.zeros(640, dtype=np.int64), "code", active)
    summary = summarize(recorder, tiny_config())
    assert summary["dead_expert_threshold"]["fraction_of_balanced_load"] == 1 / 64
    assert "1/64" in summary["dead_expert_threshold"]["description"]
    assert summary["layers"][0]["dead_experts"] == [2, 3]  # 160 each when balanced: dead under 2.5
    assert summary["layers"][0]["experts_with_no_token"] == [3]


def test_top_tokens_count_the_token_ids_routed_to_each_expert():
    from remoe.training.analysis import RoutingRecorder, _top_tokens

    recorder = RoutingRecorder(num_layers=2, num_experts=3, vocab_size=6, domains=["code"], top_tokens_layer=1)
    token_ids = np.array([4, 4, 4, 1, 1, 2])
    active = np.zeros((2, 6, 3), dtype=bool)
    active[0, :, 0] = True  # layer 0 is not the one counted
    active[1, :, 0] = [True, True, True, True, False, True]  # expert 0: token 4 three times, 1 once, 2 once
    active[1, 4, 1] = True  # expert 1: token 1 once; expert 2: nothing
    recorder.add(token_ids, "code", active)

    class Letters:
        def decode(self, ids):
            return "abcdef"[ids[0]]

    top = _top_tokens(recorder, Letters(), top=2)
    assert top["layer"] == 1
    assert top["experts"][0] == [
        {"token_id": 4, "token": "e", "count": 3, "share_of_token": 1.0},
        {"token_id": 1, "token": "b", "count": 1, "share_of_token": 0.5},  # ties: the smaller id first
    ]
    assert top["experts"][1] == [{"token_id": 1, "token": "b", "count": 1, "share_of_token": 0.5}]
    assert top["experts"][2] == []


def test_top_tokens_of_a_model_add_up_to_the_expert_load():
    model = ReMoEForCausalLM(tiny_config(num_experts=8, num_hidden_layers=3)).eval()
    recorder = record_routing(model, _blocks(), batch_size=4, top_tokens_layer=1)
    assert (recorder.expert_token_ids.sum(axis=1) == recorder.expert_tokens[1]).all()
    summary = summarize(recorder, model.config)
    for expert, tokens in enumerate(summary["top_tokens"]["experts"]):
        counts = [entry["count"] for entry in tokens]
        assert counts == sorted(counts, reverse=True) and len(counts) <= 10
        if tokens:
            assert counts[0] == recorder.expert_token_ids[expert].max()


def test_flip_rate_counts_the_decisions_whose_expert_set_changed():
    from remoe.training.analysis import RoutingRecorder

    recorder = RoutingRecorder(num_layers=2, num_experts=3, vocab_size=5, domains=["code"])
    active = np.zeros((2, 4, 3), dtype=bool)
    active[:, :, 0] = True
    other = active.copy()
    other[0, 1] = [False, True, False]  # layer 0, token 1: {0} -> {1}
    other[1, 2, 2] = True  # layer 1, token 2: {0} -> {0, 2}
    other[1, 3] = [False, False, False]  # layer 1, token 3: {0} -> {}
    recorder.add(np.arange(4), "code", active)
    recorder.add_comparison(active, other)
    stability = summarize(recorder, tiny_config(num_experts=3))["routing_stability"]
    assert stability["flip_rate_per_layer"] == [0.25, 0.5]
    assert stability["flip_rate"] == pytest.approx(0.375)
    assert stability["num_decisions"] == 8


def test_flip_rate_between_two_tiny_models():
    import copy

    model = ReMoEForCausalLM(tiny_config(num_experts=8)).eval()
    blocks = _blocks()
    same = summarize(record_routing(model, blocks, batch_size=4, compare_model=copy.deepcopy(model)), model.config)
    assert same["routing_stability"]["flip_rate"] == 0.0
    assert "routing_stability" not in summarize(record_routing(model, blocks, batch_size=4), model.config)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.router.weight[3].zero_()  # the last layer loses expert 3; layer 0 is unchanged
        last_logits = model(torch.tensor(blocks["input_ids"]), output_router_logits=True).router_logits[1]
    expected = (last_logits[:, 3] > 0).float().mean().item()  # the tokens that used expert 3 in the last layer
    assert 0 < expected < 1
    stability = summarize(record_routing(model, blocks, batch_size=4, compare_model=other), model.config)
    assert stability["routing_stability"]["flip_rate_per_layer"] == pytest.approx([0.0, expected])
    assert stability["routing_stability"]["flip_rate"] == pytest.approx(expected / 2)


def test_compare_to_refuses_another_architecture(tmp_path, capsys):
    import remoe_cli

    from .conftest import save_tiny_checkpoint

    texts = ["def f(x):\n    return x + 1\n", "The answer is 42."] * 20
    save_tiny_checkpoint(tmp_path / "a", texts, vocab_size=300, num_experts=4)
    save_tiny_checkpoint(tmp_path / "b", texts, vocab_size=300, num_experts=8)
    save_tiny_checkpoint(tmp_path / "c", texts, vocab_size=300, num_experts=4, router_type="topk")
    with pytest.raises(ValueError, match=r"^--compare_to .*b: another architecture \(model\.layers\.0\.mlp"):
        analyze(str(tmp_path / "a"), str(tmp_path / "out"), compare_to=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"^--compare_to .*c: router_type is 'topk' there and 'relu'"):
        analyze(str(tmp_path / "a"), str(tmp_path / "out"), compare_to=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"^--compare_to: .*missing: no such folder"):
        analyze(str(tmp_path / "a"), str(tmp_path / "out"), compare_to=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"^--top_tokens_layer must be an MoE layer index in 0\.\.1, got 2"):
        analyze(str(tmp_path / "a"), str(tmp_path / "out"), top_tokens_layer=2)
    argv = ["analyze", str(tmp_path / "a"), "--output_dir", str(tmp_path / "out"), "--compare_to", str(tmp_path / "b")]
    capsys.readouterr()
    assert remoe_cli.main(argv) == 2  # through the command line: one line naming the flag
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--compare_to" in error[0] and "another architecture" in error[0]
