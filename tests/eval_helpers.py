"""Tiny checkpoints for the evaluation and Hub tests, built in seconds.

- `trained_checkpoint`: a real `remoe train` run (4 steps) on a few hundred embedded-corpus documents written as local
  JSONL files, so the output folder has everything `remoe train` writes (metrics.json, training_curves.png,
  checkpoint-N/trainer_state.json). Built once per test session and shared by test_eval.py and test_hub.py.
- `lookup_checkpoint`: a ReMoE checkpoint that answers given `remoe_arith` items perfectly (see its docstring).
- `random_checkpoint`: freshly initialised weights with a tokenizer trained on corpus text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from tokenizers import AddedToken

import remoe
from remoe.training.cli import main as remoe_main
from remoe.training.data import build_embedded_corpus, train_tokenizer

from .conftest import SMALL_MODEL

MODEL = {**SMALL_MODEL, "router_type": "relu", "l1_coef_init": 1e-4, "initializer_range": 0.05}
DOCS_PER_DOMAIN = {"train": {"code": 20, "docs": 20, "math": 200}, "validation": {"code": 3, "docs": 3, "math": 30}}


def session_cache(tmp_path_factory) -> Path:
    """The REMOE_CACHE folder tests share within a session (the embedded corpus is built there once)."""
    return tmp_path_factory.getbasetemp() / "remoe-cache"


def _small_dataset(folder: Path) -> Path:
    """A few documents per domain of the embedded corpus as train.jsonl / validation.jsonl (text, domain)."""
    corpus = build_embedded_corpus()
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_domain in DOCS_PER_DOMAIN.items():
        rows, counts = [], dict.fromkeys(per_domain, 0)
        for text, domain in zip(corpus[split]["text"], corpus[split]["domain"], strict=True):
            if counts[domain] < per_domain[domain]:
                rows.append({"text": text[:2000], "domain": domain})
                counts[domain] += 1
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def trained_checkpoint(tmp_path_factory) -> Path:
    """Output folder of `remoe train` on a small local dataset (built once per session)."""
    output = tmp_path_factory.getbasetemp() / "remoe-tiny-trained"
    if (output / "metrics.json").is_file():
        return output
    work = tmp_path_factory.mktemp("tiny-train")
    run = {
        "model": MODEL,
        "data": {
            "dataset": str(_small_dataset(work / "data")),
            "vocab_size": 384,
            "block_size": 32,
            "max_eval_blocks": 4,
        },
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 2,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "save_steps": 4,
            "disable_tqdm": True,
            "use_cpu": True,
        },
    }
    (work / "run.yaml").write_text(yaml.safe_dump(run))
    staging = work / "out"
    assert remoe_main(["train", "--config", str(work / "run.yaml"), "--output_dir", str(staging)]) == 0
    shutil.move(str(staging), output)
    return output


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random weights (no training) with a BPE tokenizer trained on a few hundred corpus documents."""
    corpus = build_embedded_corpus()
    tokenizer = train_tokenizer(corpus["train"].select(range(0, len(corpus["train"]), 50))["text"], vocab_size=384)
    torch.manual_seed(seed)
    config = remoe.ReMoEConfig(
        **{**MODEL, "l1_coef_init": 1e-8},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    remoe.ReMoEForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def lookup_checkpoint(path: Path, items) -> Path:
    """A ReMoE checkpoint that answers `remoe_arith` `items` (rows with query/choices/gold) perfectly.

    The tokenizer has every query ("Question: ...\\nAnswer:") and every choice (" 42") as one added token. The model
    is a lookup table: the attention and expert output projections are zero, so the last hidden state is
    RMSNorm(embedding of the query token) = sqrt(H) * e_i, and `lm_head` maps e_i to the gold answer's token only:
    the gold choice gets logit 10 * sqrt(H), every other choice 0.
    """
    queries = list(items["query"])
    choice_texts = sorted({f" {choice}" for choices in items["choices"] for choice in choices})
    tokenizer = train_tokenizer(queries, vocab_size=300)
    tokenizer.add_tokens([AddedToken(text, normalized=False) for text in (*queries, *choice_texts)])
    for text in choice_texts:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text
    hidden = max(32, 4 * ((len(queries) + 3) // 4))
    config = remoe.ReMoEConfig(
        **{**MODEL, "hidden_size": hidden, "l1_coef_init": 1e-8},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = remoe.ReMoEForCausalLM(config)
    model.model.embed_tokens.weight.zero_()
    model.lm_head.weight.zero_()
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
    for i, (query, choices, gold) in enumerate(zip(queries, items["choices"], items["gold"], strict=True)):
        query_id = tokenizer.convert_tokens_to_ids(query)
        answer_id = tokenizer(f" {choices[gold]}", add_special_tokens=False)["input_ids"][0]
        model.model.embed_tokens.weight[query_id, i] = 1.0
        model.lm_head.weight[answer_id, i] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
