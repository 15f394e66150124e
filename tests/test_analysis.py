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
    summary = analyze(str(tmp_path / "model"), str(tmp_path / "out"), max_blocks_per_domain=2, block_size=32)
    written = json.loads((tmp_path / "out" / "routing_analysis.json").read_text())
    assert written["sparsity"] == pytest.approx(summary["sparsity"])
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
