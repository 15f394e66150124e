"""Tests for remoe.training.data: embedded corpus, local datasets, tokenizer, packing."""

import json
import shutil

import datasets
import pytest

from remoe.training import data

SMALL = 40_000  # bytes per domain for the test corpus


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REMOE_CACHE", str(tmp_path / "remoe-cache"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus")
    return cache, data.build_embedded_corpus(cache, _max_bytes_per_domain=SMALL)


@pytest.fixture(scope="module")
def corpus(built):
    return built[1]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.train_tokenizer(corpus["train"]["text"], vocab_size=600)


def _copy_cache(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "cache")
    return tmp_path / "cache"


def _count_builds(monkeypatch):
    calls = []
    real = data._generate_corpus
    monkeypatch.setattr(data, "_generate_corpus", lambda n: calls.append(n) or real(n))
    return calls


def test_default_cache_dir(monkeypatch, tmp_path):
    assert data.default_cache_dir() == tmp_path / "remoe-cache"
    monkeypatch.delenv("REMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "remoe"


def test_corpus_domains_and_splits(corpus):
    assert set(corpus) == {"train", "validation"}
    for split in corpus.values():
        assert split.column_names == ["text", "domain"]
        assert set(split["domain"]) == set(data.DOMAINS)
        assert all(t.strip() for t in split["text"])
        assert max(len(t) for t in split["text"]) <= 8000
    assert not set(corpus["train"]["text"]) & set(corpus["validation"]["text"])
    assert corpus["validation"].num_rows < corpus["train"].num_rows
    math = [t for t, d in zip(corpus["train"]["text"], corpus["train"]["domain"], strict=True) if d == "math"]
    assert all(t.startswith("Question: ") and "\nAnswer: " in t for t in math)
    code = [t for t, d in zip(corpus["train"]["text"], corpus["train"]["domain"], strict=True) if d == "code"]
    assert any("def " in t or "import " in t for t in code)


def test_corpus_is_stable_across_builds(built, tmp_path):
    other = data.build_embedded_corpus(tmp_path / "other", _max_bytes_per_domain=SMALL)
    for split in ("train", "validation"):
        assert other[split]["text"] == built[1][split]["text"]
        assert other[split]["domain"] == built[1][split]["domain"]


def test_corpus_loaded_from_cache(built, tmp_path, monkeypatch):
    cache = _copy_cache(built, tmp_path)
    calls = _count_builds(monkeypatch)
    again = data.build_embedded_corpus(cache, _max_bytes_per_domain=SMALL)
    assert calls == []
    assert again["validation"]["text"] == built[1]["validation"]["text"]
    data.build_embedded_corpus(cache, _max_bytes_per_domain=SMALL, rebuild=True)
    assert calls == [SMALL]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("damage", ["delete_arrow", "garbage_manifest", "no_manifest", "wrong_rows", "other_size"])
def test_corrupt_cache_is_rebuilt(built, tmp_path, monkeypatch, damage):
    cache = _copy_cache(built, tmp_path)
    folder, size = cache / "corpus-v1", SMALL
    if damage == "delete_arrow":
        next((folder / "train").glob("*.arrow")).unlink()
    elif damage == "garbage_manifest":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "wrong_rows":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["rows"]["train"] += 1
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        size = SMALL // 2
    calls = _count_builds(monkeypatch)
    rebuilt = data.build_embedded_corpus(cache, _max_bytes_per_domain=size)
    assert calls == [size]
    assert set(rebuilt["train"]["domain"]) == set(data.DOMAINS)
    assert json.loads((folder / "manifest.json").read_text())["max_bytes"] == size
    assert data.build_embedded_corpus(cache, _max_bytes_per_domain=size)["train"].num_rows == rebuilt["train"].num_rows
    assert calls == [size]


def test_concurrent_build_keeps_the_winner(tmp_path, monkeypatch):
    real, cache, size = data._generate_corpus, tmp_path / "cache", 5_000

    def slow_build(n):  # another process finishes its build while this one is still building
        monkeypatch.setattr(data, "_generate_corpus", real)
        winner = data.build_embedded_corpus(cache, _max_bytes_per_domain=size)
        (cache / "corpus-v1" / "winner").write_text("")
        return winner

    monkeypatch.setattr(data, "_generate_corpus", slow_build)
    loser = data.build_embedded_corpus(cache, _max_bytes_per_domain=size)
    assert (cache / "corpus-v1" / "winner").exists()
    assert loser["train"].num_rows > 0
    assert sorted(p.name for p in cache.iterdir()) == ["corpus-v1"]


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert {"<|endoftext|>", "<|pad|>"} <= set(tokenizer.get_vocab())
    assert 258 < len(tokenizer) <= 600
    for text in ["def f(x):\n    return x + 1  # ok\n", "Grüße, 日本語, émoji 🙂\t\n  x", "  leading and trailing  "]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["abc"], vocab_size=100)


def test_tokenizer_cache(corpus, tmp_path, monkeypatch):
    tok = data.load_or_train_tokenizer(corpus, vocab_size=400, cache_dir=tmp_path)
    (folder,) = [p for p in tmp_path.iterdir()]
    assert folder.name.startswith("tokenizer-v1-400-")
    monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: pytest.fail("should load from cache"))
    again = data.load_or_train_tokenizer(corpus, vocab_size=400, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab() and again.eos_token == tok.eos_token
    assert again("x = 1\n")["input_ids"] == tok("x = 1\n")["input_ids"]
    monkeypatch.undo()
    (folder / "tokenizer.json").write_text("garbage")
    rebuilt = data.load_or_train_tokenizer(corpus, vocab_size=400, cache_dir=tmp_path)
    assert rebuilt.get_vocab() == tok.get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def _stream(tokenizer, texts):
    return [i for t in texts for i in [*tokenizer(t, verbose=False)["input_ids"], tokenizer.eos_token_id]]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_packing(corpus, tokenizer, num_proc):
    block = 64
    packed = data.pack_dataset(corpus["validation"], tokenizer, block, num_proc=num_proc)
    assert packed.column_names == ["input_ids", "domain"]
    assert all(len(ids) == block for ids in packed["input_ids"])
    for domain in data.DOMAINS:  # each domain's blocks are exactly its own eos-separated token stream, cut
        texts = [
            t for t, d in zip(corpus["validation"]["text"], corpus["validation"]["domain"], strict=True) if d == domain
        ]
        stream = _stream(tokenizer, texts)
        got = [i for ids, d in zip(packed["input_ids"], packed["domain"], strict=True) if d == domain for i in ids]
        assert len(got) == len(stream) // block * block > 0
        assert got == stream[: len(got)]
    splits = data.packed_splits(corpus, tokenizer, block)
    assert set(splits) == {"train", "validation"} and splits["train"].num_rows > packed.num_rows


def test_collated_labels_keep_end_of_text_when_pad_is_eos(corpus, tokenizer):
    """Blocks are full length: every id is a label, also the eos tokens a pad-is-eos tokenizer would mask."""
    packed = data.pack_dataset(corpus["validation"], tokenizer, 64)
    features = [row for row in packed if tokenizer.eos_token_id in row["input_ids"]][:4]
    assert features
    batch = data.collate_blocks(features)
    assert batch["input_ids"].shape == (len(features), 64) and batch["input_ids"].dtype.is_floating_point is False
    assert batch["labels"].tolist() == [feature["input_ids"] for feature in features]
    assert (batch["labels"] == tokenizer.eos_token_id).any()


def test_packing_errors(corpus, tokenizer):
    with pytest.raises(ValueError, match="block_size"):
        data.pack_dataset(corpus["validation"], tokenizer, 10**8)
    with pytest.raises(ValueError, match="block_size"):
        data.pack_dataset(corpus["validation"], tokenizer, 1)
    plain = datasets.Dataset.from_dict({"text": ["a b c"] * 30})
    assert set(data.pack_dataset(plain, tokenizer, 8)["domain"]) == {"default"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_local_jsonl_renames_column(tmp_path):
    rows = [{"content": f"document number {i}", "meta": i} for i in range(100)] + [{"content": "  ", "meta": -1}]
    path = _write_jsonl(tmp_path / "mydata.jsonl", rows)
    dsd = data.load_text_dataset(str(path), text_column="content", cache_dir=tmp_path)
    assert set(dsd) == {"train", "validation"}
    assert dsd["train"].column_names == ["text", "domain"] and set(dsd["train"]["domain"]) == {"mydata"}
    assert dsd["validation"].num_rows == 5 and dsd["train"].num_rows == 95  # blank row dropped
    assert not set(dsd["train"]["text"]) & set(dsd["validation"]["text"])
    again = data.load_text_dataset(str(path), text_column="content", cache_dir=tmp_path)
    assert again["validation"]["text"] == dsd["validation"]["text"]
    streamed = data.load_text_dataset(str(path), text_column="content", streaming=True, cache_dir=tmp_path)
    assert isinstance(streamed, datasets.IterableDatasetDict)
    assert len(list(streamed["train"])) + len(list(streamed["validation"])) == 100
    assert next(iter(streamed["validation"])) == {"text": "document number 0", "domain": "mydata"}


def test_load_local_txt_parquet_and_split_files(tmp_path):
    (tmp_path / "notes.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    dsd = data.load_text_dataset(str(tmp_path / "notes.txt"), validation_fraction=0.25, cache_dir=tmp_path)
    assert (dsd["train"].num_rows, dsd["validation"].num_rows) == (30, 10)
    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_dict({"body": [f"row {i}" for i in range(20)], "domain": ["x"] * 20}).to_parquet(
        pq / "a.parquet"
    )
    dsd = data.load_text_dataset(str(pq), text_column="body", cache_dir=tmp_path)
    assert dsd["train"].column_names == ["text", "domain"] and set(dsd["train"]["domain"]) == {"x"}
    split = tmp_path / "split"
    split.mkdir()
    _write_jsonl(split / "train.jsonl", [{"text": f"t{i}"} for i in range(10)])
    _write_jsonl(split / "validation.jsonl", [{"text": "v0"}, {"text": "v1"}])
    dsd = data.load_text_dataset(str(split), cache_dir=tmp_path)
    assert dsd["validation"]["text"] == ["v0", "v1"] and dsd["train"].num_rows == 10
    assert set(dsd["train"]["domain"]) == {"split"}


def test_load_builtin(corpus, monkeypatch):
    monkeypatch.setattr(data, "build_embedded_corpus", lambda cache_dir=None: corpus)
    assert data.load_text_dataset() is corpus
    streamed = data.load_text_dataset("builtin", streaming=True)
    assert next(iter(streamed["train"]))["domain"] in data.DOMAINS


def test_load_errors(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}, {"content": "y"}])
    with pytest.raises(ValueError, match=r"text_column='text'.*available columns: \['content'\]"):
        data.load_text_dataset(str(path), cache_dir=tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_text_dataset(str(tmp_path / "empty.jsonl"), cache_dir=tmp_path)
    _write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(ValueError, match="empty"):
        data.load_text_dataset(str(tmp_path / "blank.jsonl"), cache_dir=tmp_path)
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"extension '\.xml'.*\.jsonl"):
        data.load_text_dataset(str(tmp_path / "d.xml"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="name_or_path="):
        data.load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="name_or_path="):
        data.load_text_dataset("./no/such/dir")
    with pytest.raises(ValueError, match="validation_fraction"):
        data.load_text_dataset(str(path), validation_fraction=1.5)
