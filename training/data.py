"""The data stage of a run: the embedded default corpus, text dataset loading (local files, the Hub, streaming),
tokenizer loading or training, and packing into fixed-length blocks.

`prepare_data` is the whole stage for `remoe train`: tokenizer, corpus, domain selection and packed splits.
"""

from __future__ import annotations

import array
import ast
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

from remoe.checkpoints import load_tokenizer, replace_folder

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "docs", "math")
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
CORPUS_VERSION = 1
_MAX_DOC_CHARS, _VALIDATION_FRACTION, _SEED = 8000, 0.05, 1234
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SPLIT_NAME = re.compile(r"^(train|validation|valid|val|dev|test)(?=[-_.]|$)", re.IGNORECASE)
_TOKENIZER_MAX_CHARS = 200_000_000


def default_cache_dir() -> Path:
    """$REMOE_CACHE if set, else $XDG_CACHE_HOME/remoe, else ~/.cache/remoe."""
    if os.environ.get("REMOE_CACHE"):
        return Path(os.environ["REMOE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "remoe"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _chunks(text: str, limit: int = _MAX_DOC_CHARS) -> list[str]:
    """Split text on blank lines into pieces of at most `limit` chars (longer paragraphs are cut)."""
    out = [""]
    for para in text.split("\n\n"):
        for piece in (para[i : i + limit] for i in range(0, max(len(para), 1), limit)):
            if out[-1] and len(out[-1]) + 2 + len(piece) > limit:
                out.append(piece)
            else:
                out[-1] = f"{out[-1]}\n\n{piece}" if out[-1] else piece
    return [c for c in out if c.strip()]


def _module_doc(source: str, name: str) -> str:
    """pydoc-like text of a module's docstrings, read with ast (nothing is imported)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = [f"Help on module {name}:\n\n{ast.get_docstring(tree) or ''}".rstrip()]

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                is_class = isinstance(node, ast.ClassDef)
                sig = ", ".join(map(ast.unparse, node.bases)) if is_class else ast.unparse(node.args)
                if doc := ast.get_docstring(node):
                    head = f"{'class' if is_class else 'def'} {prefix}{node.name}({sig})"
                    parts.append(f"{head}:\n" + textwrap.indent(doc, "    "))
                if is_class:
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return "\n\n".join(parts) if len(parts) > 1 or ast.get_docstring(tree) else ""


def _code_docs(files: list[Path], root: Path) -> Iterator[tuple[str, str]]:
    for path in files:
        for i, chunk in enumerate(_chunks(_read(path))):
            yield f"code/{path.relative_to(root).as_posix()}#{i}", chunk


def _docs_docs(files: list[Path], root: Path) -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    sources: list[str | Path] = sorted(topics) + files
    random.Random(_SEED).shuffle(sources)
    for src in sources:
        if isinstance(src, str):
            key, text = f"docs/topic/{src}", topics[src]
        else:
            rel = src.relative_to(root).with_suffix("").as_posix()
            key, text = f"docs/module/{rel}", _module_doc(_read(src), rel.removesuffix("/__init__").replace("/", "."))
        for i, chunk in enumerate(_chunks(text)):
            yield f"{key}#{i}", chunk


_NAMES = ("Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Sam", "Zoe", "Kofi", "Ines", "Yuki", "Liam", "Nora", "Ivan")
_ITEMS = ("apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "cards", "shells", "eggs", "stamps")
_MATH = (  # "question|solution|answer", formatted with the values drawn in _math_problem
    "{n} has {big} {it} and buys {b} more. How many {it} does {n} have?||{big_b}",
    "{n} had {big} {it} and gave {a} of them to {m}. How many {it} does {n} have left?||{big_a}",
    "There are {a} bags with {b} {it} in each bag. How many {it} are there in total?||{ab}",
    "{n} shares {ac} {it} equally among {c} friends. How many {it} does each friend get?||{a}",
    "What is ({a} {op} {b}) * {c}?|{a} {op} {b} = {v}. {v} * {c} = {vc}.|{vc}",
    "What is {p}% of {q}?|{q} * {p} / 100 = {d}.|{d}",
    "A jacket costs ${q} and is on sale for {p}% off. What is the sale price?|{p}% of {q} is {d}. {q} - {d} = {qd}.|{qd}",
    "{n} buys {a} packs of {b} {it} and gives {c} to {m}. How many {it} are left?|{a} * {b} = {ab}. {ab} - {c} = {ab_c}.|{ab_c}",
    "{n} earns ${b} an hour, {c} hours a day, for {a} days. How much is that?|{b} * {c} = {bc}. {bc} * {a} = {abc}.|{abc}",
    "Solve for x: {c}x {sign} {abs_k} = {cxk}.|{move} both sides: {c}x = {cx}. Divide by {c}: x = {x}.|x = {x}",
)


def _math_problem(rng: random.Random) -> str:
    """One problem: "Question: ...", an optional "Solution: ..." line, then "Answer: ..."."""
    r = rng.randint
    (n, m), it, op = rng.sample(_NAMES, 2), rng.choice(_ITEMS), rng.choice("+-")
    a, b, c, big, x, k, p, q = (
        r(2, 30),
        r(2, 30),
        r(2, 12),
        r(30, 999),
        r(-9, 20),
        r(-50, 50),
        5 * r(1, 18),
        20 * r(1, 25),
    )
    v, d = a + b if op == "+" else a - b, q * p // 100
    values = {"n": n, "m": m, "it": it, "op": op, "a": a, "b": b, "c": c, "big": big, "x": x, "p": p, "q": q, "v": v}
    values |= {"d": d, "big_b": big + b, "big_a": big - a, "ab": a * b, "ac": a * c, "vc": v * c, "qd": q - d}
    values |= {"ab_c": a * b - c, "bc": b * c, "abc": a * b * c, "cx": c * x, "cxk": c * x + k, "abs_k": abs(k)}
    values |= {"sign": "-" if k < 0 else "+", "move": f"Subtract {k} from" if k >= 0 else f"Add {-k} to"}
    question, solution, answer = rng.choice(_MATH).format(**values).split("|")
    return f"Question: {question}\n" + (f"Solution: {solution}\n" if solution else "") + f"Answer: {answer}"


def _validation_ids(docs: list[tuple[str, str]]) -> set[str]:
    """Ids of the documents with the smallest id hashes, up to ~5% of the bytes (>= 1 doc, < all docs)."""
    budget, out = _VALIDATION_FRACTION * sum(len(t.encode()) for _, t in docs), set()
    for doc_id, text in sorted(docs, key=lambda doc: hashlib.blake2b(doc[0].encode(), digest_size=16).digest()):
        if len(out) + 1 >= len(docs) or (out and budget <= 0):
            break
        out.add(doc_id)
        budget -= len(text.encode())
    return out


def _generate_corpus(max_bytes_per_domain: int) -> datasets.DatasetDict:
    """Build the corpus in memory: each domain's documents in a fixed order, up to the byte cap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    code_files = random.Random(_SEED).sample(files, len(files))
    rng, seen = random.Random(_SEED), set()
    sources = {
        "code": _code_docs(code_files, root),
        "docs": _docs_docs(files, root),
        "math": ((f"math/{i}", _math_problem(rng)) for i in itertools.count()),
    }
    rows: dict[str, dict[str, list[str]]] = {s: {"text": [], "domain": []} for s in ("train", "validation")}
    for domain in DOMAINS:
        docs, size = [], 0
        with tqdm(total=max_bytes_per_domain, desc=f"corpus/{domain}", unit="B", unit_scale=True) as bar:
            for doc_id, text in sources[domain]:
                if size >= max_bytes_per_domain:
                    break
                if text in seen:  # identical documents (e.g. repeated math problems) are kept once
                    continue
                seen.add(text)
                docs.append((doc_id, text))
                size += len(text.encode())
                bar.update(len(text.encode()))
        val = _validation_ids(docs)
        for doc_id, text in docs:
            split = rows["validation" if doc_id in val else "train"]
            split["text"].append(text)
            split["domain"].append(domain)
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(r) for s, r in rows.items()})


def _atomic_publish(tmp: Path, final: Path, keep_existing: Callable[[], bool]) -> None:
    """Publish `tmp` as `final`; a concurrent process that published first wins (its folder is then loaded)."""
    with contextlib.suppress(OSError):
        replace_folder(tmp, final, keep_existing)


def _load_corpus(path: Path, params: dict) -> datasets.DatasetDict | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if any(manifest.get(k) != v for k, v in params.items()):
            return None
        dsd = datasets.load_from_disk(str(path))
        ok = isinstance(dsd, datasets.DatasetDict) and {s: d.num_rows for s, d in dsd.items()} == manifest["rows"]
        return dsd if ok and all(d.column_names == ["text", "domain"] for d in dsd.values()) else None
    except Exception as e:
        logger.info("corpus cache at %s is unusable (%s: %s)", path, type(e).__name__, e)
        return None


def build_embedded_corpus(
    cache_dir: str | Path | None = None, *, rebuild: bool = False, _max_bytes_per_domain: int = 3_000_000
) -> datasets.DatasetDict:
    """The built-in code/docs/math corpus ("train"/"validation"; columns "text", "domain"), cached on disk."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"corpus-v{CORPUS_VERSION}"
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    params = {"version": CORPUS_VERSION, "python": python, "max_bytes": _max_bytes_per_domain}
    if not rebuild and (dsd := _load_corpus(final, params)) is not None:
        return dsd
    logger.info("building the embedded corpus in %s", final)
    dsd = _generate_corpus(_max_bytes_per_domain)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    tmp.chmod(0o755)
    try:
        dsd.save_to_disk(str(tmp))
        domain_rows = {s: dict(sorted(Counter(d["domain"]).items())) for s, d in dsd.items()}
        manifest = {**params, "rows": {s: d.num_rows for s, d in dsd.items()}, "domain_rows": domain_rows}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _atomic_publish(tmp, final, lambda: not rebuild and _load_corpus(final, params) is not None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_corpus(final, params) or dsd


def _local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder, data_files by split) for a local file or directory; splits are inferred from file names."""
    where, allowed = f"name_or_path={str(path)!r}", ", ".join(sorted(_EXTENSIONS))
    if path.is_file() and path.suffix.lower() not in _EXTENSIONS:
        raise ValueError(f"{where}: unsupported file extension {path.suffix!r}; allowed: {allowed}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in _EXTENSIONS)
    files = [p for p in files if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)]
    if not files:
        raise ValueError(f"{where}: the directory holds no data files with an allowed extension ({allowed})")
    if len(builders := {_EXTENSIONS[p.suffix.lower()] for p in files}) > 1:
        raise ValueError(f"{where}: mixes file types {sorted(builders)}; use one format")
    if all(p.stat().st_size == 0 for p in files):
        raise ValueError(f"{where}: the dataset is empty")
    data_files: dict[str, list[str]] = {}
    for p in files:
        name = m.group(1).lower() if (m := _SPLIT_NAME.match(p.stem)) else "train"
        data_files.setdefault("validation" if name in ("valid", "val", "dev") else name, []).append(str(p))
    return builders.pop(), data_files


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _load_dataset(where: str, *args, **kwargs):
    """`datasets.load_dataset` with its failures as one line naming the dataset and the innermost cause."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, OSError, ValueError) as error:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise ValueError(f"{where}: could not be read ({type(cause).__name__}: {_first_line(cause)})") from error


def check_text_file(path: Path, builder: str, text_column: str) -> None:
    """Raise `ValueError` naming the file and line unless a text or json/jsonl file is UTF-8 and every json record is
    a JSON object with a `text_column` field that is a string (checked before `datasets` reads it, which reports
    none of these, and would drop a record without the field or with null)."""
    if builder == "text":
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                _decode(path, raw, line_number)
        return
    if builder != "json":  # csv, parquet: `datasets` reports their errors (see `_load_dataset`)
        return
    text = _decode(path, path.read_bytes(), None)
    try:  # a JSON document: an array of records, or one record
        document = json.loads(text)
        records = [(1, record) for record in (document if isinstance(document, list) else [document])]
    except json.JSONDecodeError:  # JSON Lines
        records = []
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
    # a file where no record has the field is reported by `load_text_dataset`, with the columns it does have
    any_has_column = any(isinstance(record, dict) and text_column in record for _, record in records)
    for line_number, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object per record, got {type(record).__name__}")
        if text_column not in record and any_has_column:
            keys = ", ".join(map(repr, list(record)[:5])) or "none"
            raise ValueError(
                f"{path}:{line_number}: the record has no {text_column!r} field (its keys: {keys}); every record "
                "needs one, or name the text field with --text_column (data.text_column)"
            )
        value = record.get(text_column, "")
        if not isinstance(value, str):
            raise ValueError(
                f"{path}:{line_number}: {text_column!r} must be a string, got {type(value).__name__} {value!r:.40}"
            )


def _decode(path: Path, raw: bytes, line_number: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if line_number is None:
            line_number = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x}); re-encode the file as UTF-8"
        ) from None


def load_text_dataset(
    name_or_path: str = "builtin",
    *,
    text_column: str = "text",
    validation_fraction: float = 0.05,
    seed: int = 0,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load "builtin", a local file/directory (json, jsonl, txt, text, parquet, csv) or a Hub dataset.

    Returns "train" and "validation" splits with columns "text" and "domain"; rows with blank text are dropped.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if name_or_path == "builtin":
        dsd = build_embedded_corpus(cache_dir)
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dsd.items()}) if streaming else dsd
    path, where = Path(name_or_path).expanduser(), f"name_or_path={name_or_path!r}"
    hf_cache = str(Path(cache_dir) / "datasets") if cache_dir is not None else None
    if path.exists():
        builder, data_files = _local_data_files(path)
        if not streaming:  # a streamed corpus may be too large to read twice; its errors come while training
            for files in data_files.values():
                for file in files:
                    check_text_file(Path(file), builder, text_column)
        short = path.resolve().stem if path.is_file() else path.resolve().name
        dsd = _load_dataset(where, builder, data_files=data_files, streaming=streaming, cache_dir=hf_cache)
    elif HUB_ID.match(name_or_path) and Path(name_or_path).suffix.lower() not in _EXTENSIONS:
        short = name_or_path.split("/")[-1]
        dsd = _load_dataset(where, name_or_path, streaming=streaming, cache_dir=hf_cache)
    else:
        raise ValueError(f"{where}: no such file or directory, and not a Hugging Face Hub dataset id")
    if "train" not in dsd:
        raise ValueError(f"{where}: no 'train' split; available splits: {list(dsd)}")
    for alias in ("valid", "val", "dev"):
        if "validation" not in dsd and alias in dsd:
            dsd["validation"] = dsd.pop(alias)
    for split, ds in dsd.items():
        if (cols := ds.column_names) is not None and text_column not in cols:
            raise ValueError(f"text_column={text_column!r} not in split {split!r}; available columns: {cols}")
        has_domain = cols is not None and "domain" in cols and text_column != "domain"
        ds = ds.select_columns([text_column, "domain"] if has_domain else [text_column])
        ds = ds.rename_column(text_column, "text") if text_column != "text" else ds
        ds = ds.filter(lambda texts: [bool(t and t.strip()) for t in texts], batched=True, input_columns="text")
        add_domain = lambda texts: {"domain": [short] * len(texts)}  # noqa: E731
        dsd[split] = ds if has_domain else ds.map(add_domain, batched=True, input_columns="text")
    if not streaming and dsd["train"].num_rows == 0:
        raise ValueError(f"{where}: the dataset is empty (no rows with non-blank text)")
    if "validation" not in dsd and streaming:
        period, train = max(2, round(1 / validation_fraction)), dsd["train"]
        dsd["train"] = train.filter(lambda _, i: i % period != 0, with_indices=True)
        dsd["validation"] = train.filter(lambda _, i: i % period == 0, with_indices=True)
    elif "validation" not in dsd:
        if dsd["train"].num_rows < 2:
            raise ValueError(f"{where}: needs >= 2 rows to split off a validation set")
        parts = dsd["train"].train_test_split(test_size=validation_fraction, seed=seed)
        dsd["train"], dsd["validation"] = parts["train"], parts["test"]
    return dsd


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, *, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer; "<|endoftext|>" is bos and eos, "<|pad|>" is pad."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet, specials = pre_tokenizers.ByteLevel.alphabet(), [EOS_TOKEN, PAD_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if hasattr(texts, "__len__") else None)
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, clean_up_tokenization_spaces=False, **special
    )


def _fingerprint(ds: datasets.Dataset, samples: int = 64) -> str:
    """Hash of the row count and of up to `samples` evenly spaced texts."""
    h, last = hashlib.sha256(str(ds.num_rows).encode()), ds.num_rows - 1
    for text in ds.select(sorted({i * last // (samples - 1) for i in range(samples)}) if last >= 0 else [])["text"]:
        h.update(hashlib.sha256((text or "").encode()).digest())
    return h.hexdigest()[:16]


def _texts(ds: datasets.Dataset, max_chars: int) -> Iterator[str]:
    seen = 0
    for text in itertools.chain.from_iterable(batch["text"] for batch in ds.iter(batch_size=1000)):
        if seen >= max_chars:
            return
        seen += len(text or "")
        yield text or ""


def load_or_train_tokenizer(
    corpus: datasets.DatasetDict, vocab_size: int = 8192, cache_dir: str | Path | None = None, *, rebuild: bool = False
) -> PreTrainedTokenizerFast:
    """Tokenizer trained on corpus["train"]["text"], cached under cache_dir/tokenizer-v1-{vocab_size}-{fingerprint}."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"tokenizer-v1-{vocab_size}-{_fingerprint(corpus['train'])}"

    def load() -> PreTrainedTokenizerFast | None:
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(final))
            return tok if tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN else None
        except Exception as e:
            logger.info("tokenizer cache at %s is unusable (%s: %s)", final, type(e).__name__, e)
            return None

    if not rebuild and final.exists() and (tok := load()) is not None:
        return tok
    tok = train_tokenizer(_texts(corpus["train"], _TOKENIZER_MAX_CHARS), vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    tmp.chmod(0o755)
    try:
        tok.save_pretrained(str(tmp))
        _atomic_publish(tmp, final, lambda: not rebuild and load() is not None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load() or tok


def _tokenize_documents(tokenizer, texts: list[str | None], eos: int | None) -> list[list[int]]:
    """Token ids of each document (no special tokens), with `eos` appended when given."""
    ids = tokenizer([text or "" for text in texts], add_special_tokens=False, verbose=False)["input_ids"]
    return [[*document, eos] for document in ids] if eos is not None else ids


def pack_dataset(
    dataset: datasets.Dataset, tokenizer, block_size: int, *, num_proc: int | None = None, add_eos: bool = True
) -> datasets.Dataset:
    """Tokenize, append eos after every document, concatenate per domain and cut into blocks of block_size ids."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset has no 'text' column; columns: {dataset.column_names}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos_token; set one or pass add_eos=False")
    has_domain = "domain" in dataset.column_names

    def tokenize(batch: dict) -> dict:
        ids = _tokenize_documents(tokenizer, batch["text"], eos if add_eos else None)
        return {"input_ids": ids, "domain": batch["domain"] if has_domain else ["default"] * len(ids)}

    columns = dataset.column_names
    tokenized = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=columns, desc="Tokenizing")
    streams: dict[str, array.array] = {}
    for batch in tqdm(tokenized.iter(batch_size=2000), total=-(-len(tokenized) // 2000), desc="Packing"):
        for domain, ids in zip(batch["domain"], batch["input_ids"], strict=True):
            streams.setdefault(domain, array.array("i")).extend(ids)
    blocks, domains, total = [], [], 0
    for domain, stream in streams.items():
        flat = np.frombuffer(stream, dtype=np.int32)
        total, n = total + len(flat), len(flat) // block_size
        if n == 0:
            logger.warning("domain %r has %d tokens, fewer than block_size=%d: dropped", domain, len(flat), block_size)
        blocks.append(flat[: n * block_size].reshape(n, block_size))
        domains += [domain] * n
    if not domains:
        raise ValueError(f"dataset too small for block_size={block_size}: {total} tokens in total")
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "domain": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict({"input_ids": np.concatenate(blocks), "domain": domains}, features=features)


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of packed fixed-length blocks for causal LM training: the labels are the inputs, every id counted.

    Unlike `DataCollatorForLanguageModeling`, no label is masked where it equals the pad id, so end-of-text tokens
    still count when a tokenizer's pad token is its eos token."""
    batch = default_data_collator([{"input_ids": feature["input_ids"]} for feature in features])
    batch["labels"] = batch["input_ids"].clone()
    return batch


def packed_splits(
    dataset_dict: datasets.DatasetDict, tokenizer, block_size: int, *, num_proc: int | None = None
) -> datasets.DatasetDict:
    """pack_dataset applied to the "train" and "validation" splits."""
    splits = ("train", "validation")
    return datasets.DatasetDict(
        {s: pack_dataset(dataset_dict[s], tokenizer, block_size, num_proc=num_proc) for s in splits}
    )


def pack_iterable(dataset, tokenizer, block_size: int, *, keep_domain: bool = False, batch_size: int = 1000):
    """Streaming packing: tokenize `batch_size` documents at a time, append eos, concatenate per domain and cut into
    blocks of `block_size` ids (each batch's remainder is dropped, as in Transformers' `run_clm.py`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one to pack documents")

    def pack(batch: dict) -> dict:
        streams: dict[str, list[int]] = {}
        for domain, document in zip(batch["domain"], _tokenize_documents(tokenizer, batch["text"], eos), strict=True):
            streams.setdefault(domain, []).extend(document)
        blocks, domains = [], []
        for domain, stream in streams.items():
            count = len(stream) // block_size
            blocks += [stream[i * block_size : (i + 1) * block_size] for i in range(count)]
            domains += [domain] * count
        return {"input_ids": blocks, "domain": domains} if keep_domain else {"input_ids": blocks}

    return dataset.map(pack, batched=True, batch_size=batch_size, remove_columns=["text", "domain"])


def streaming_packed_splits(corpus, tokenizer, block_size: int, max_eval_blocks: int, seed: int) -> dict:
    """`--streaming`: the train split stays an `IterableDataset` (shuffled through a buffer and packed on the fly;
    the Trainer's data loader reads it on rank 0 and dispatches each rank its own batches, so no sample is seen
    twice); the first `4 * max_eval_blocks` packed validation blocks are kept in memory for the final evaluation."""
    train = pack_iterable(corpus["train"].shuffle(seed=seed, buffer_size=10_000), tokenizer, block_size)
    if next(iter(train), None) is None:
        raise ValueError(f"the streaming dataset is empty or has fewer than block_size={block_size} tokens")
    validation_blocks = pack_iterable(corpus["validation"], tokenizer, block_size, keep_domain=True)
    rows = list(itertools.islice(validation_blocks, 4 * max_eval_blocks))
    if not rows:
        raise ValueError(f"the streaming validation split has fewer than block_size={block_size} tokens")
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "domain": datasets.Value("string")}
    )
    return {"train": train, "validation": datasets.Dataset.from_list(rows, features=features)}


def select_domains(corpus, domains: list[str] | None):
    """Keep only the rows of `domains` (every split), with a clear error for a domain the data does not have."""
    if not domains:
        return corpus
    available = sorted(set(corpus["train"]["domain"]))
    unknown = sorted(set(domains) - set(available))
    if unknown:
        raise ValueError(f"--domains {unknown} not in the dataset; available: {available}")
    return corpus.filter(lambda row: row["domain"] in domains)


def load_tokenizer_source(source: str):
    """`--tokenizer`: a local tokenizer folder (checked) or a Hub name, with a one-line error for either."""
    path = Path(source).expanduser()
    if path.exists():
        return load_tokenizer(path)
    if not HUB_ID.match(source):
        raise ValueError(f"--tokenizer {source!r}: no such folder, and not a Hugging Face Hub name")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--tokenizer {source!r}: not a local folder, and loading it from the Hub failed "
            f"({str(error).splitlines()[0]})"
        ) from error


@dataclasses.dataclass
class PreparedData:
    """What the data stage hands to training: the tokenizer and the packed `train` and `validation` blocks."""

    tokenizer: Any
    train: Any  # `datasets.Dataset`, or an `IterableDataset` with streaming
    validation: datasets.Dataset


def prepare_data(
    data: dict[str, Any],
    *,
    seed: int,
    model_name_or_path: str | None = None,
    streaming: bool = False,
    num_proc: int | None = None,
) -> PreparedData:
    """The data stage of `remoe train` from the run's checked `data` section: the tokenizer (`data.tokenizer`, the
    continued model's, or one trained on the corpus), the corpus with its selected domains, and the packed splits."""
    tokenizer = None
    if data.get("tokenizer"):
        tokenizer = load_tokenizer_source(data["tokenizer"])
    elif model_name_or_path:
        tokenizer = load_tokenizer(model_name_or_path)
    corpus = load_text_dataset(
        data["dataset"], text_column=data.get("text_column", "text"), seed=seed, streaming=streaming
    )
    corpus = select_domains(corpus, data.get("domains"))
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(corpus, vocab_size=data["vocab_size"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if streaming:
        packed = streaming_packed_splits(corpus, tokenizer, data["block_size"], data["max_eval_blocks"], seed)
    else:
        packed = packed_splits(corpus, tokenizer, data["block_size"], num_proc=num_proc)
    return PreparedData(tokenizer=tokenizer, train=packed["train"], validation=packed["validation"])
