"""Reading checkpoint folders safely: safetensors only, every file checked, config and weights checked together.

Every `remoe` command opens a ReMoE checkpoint through `load_model` / `check_checkpoint`, so a bad folder fails before
any work with one line naming the file: a missing folder or config, a config of another model type, pickle-only
weights (never unpickled), a truncated or corrupt safetensors file, or weights that do not match the config (missing,
unexpected or differently shaped tensors, e.g. a config with 2 layers over weights with 4).

`SafetensorsCheckpoint` gives lazy, memory-mapped access to the tensors of any Transformers checkpoint folder (the
conversion code reads its sources through it). `replace_folder` publishes a finished folder in one rename (the
conversion writer, the Trainer's staged saves and the embedded corpus cache all publish through it).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError  # the base of the strict-dataclass validation errors
from safetensors import safe_open

from .configuration_remoe import ReMoEConfig

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_WEIGHTS = re.compile(r"(pytorch_model|model|adapter_model)(-\d+-of-\d+)?\.(bin|pt|pth|ckpt)")
_MAX_HEADER_BYTES = 100 * 2**20
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # some older checkpoints carry the RoPE buffer
_INTEGER_TENSORS = re.compile(r"(^|\.)router\.hash_table$")  # the Hash router's token -> experts table (int64)
# Keys a ReMoE config.json may hold besides what `ReMoEConfig().to_dict()` writes: Transformers' own bookkeeping and
# the legacy names it still reads.
_CONFIG_EXTRA_KEYS = {"auto_map", "torch_dtype", "experts_implementation", "rope_theta", "rope_scaling"}
# Errors Transformers or torch raise while building a model from a config whose values they cannot use.
_MODEL_BUILD_ERRORS = (KeyError, RuntimeError, AttributeError, ValueError, TypeError, ZeroDivisionError, IndexError)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as it is; the message names the file and what is wrong."""


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries (`dtype`, `shape`, `data_offsets`) of a safetensors file, after checking that the file is a
    complete safetensors file: a readable header whose tensors end exactly at the end of the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes: empty or truncated)")
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError) as error:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    try:
        data_size = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    except (KeyError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path}: not a safetensors file (malformed tensor entry: {error})") from error
    if 8 + header_size + data_size != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file: its header describes {8 + header_size + data_size} "
            f"bytes, the file has {size}"
        )
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (from the index when there is one)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: unreadable safetensors index ({error})") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing[:3]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(path.name for path in folder.iterdir() if _PICKLE_WEIGHTS.fullmatch(path.name))
        hint = (
            f"; it has pickle weights {pickled[:3]}, which remoe never loads (unpickling runs arbitrary code): "
            "re-save them with `save_pretrained` (safetensors) where you trust them"
            if pickled
            else ""
        )
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    return files


class SafetensorsCheckpoint:
    """Lazy, memory-mapped access to the tensors of a Transformers checkpoint folder (one file or an index)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint folder")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint folder: it has no config.json")
        try:
            self.config_dict: dict[str, Any] = json.loads(config_file.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise CheckpointError(f"{config_file}: not valid JSON ({error})") from error
        if not isinstance(self.config_dict, dict):
            raise CheckpointError(f"{config_file}: must hold a JSON object")
        self.weight_map: dict[str, str] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        for file in _weight_files(self.path):
            for name, entry in read_safetensors_header(file).items():
                self.weight_map[name], self._entries[name] = file.name, entry
        self._handles: dict[str, Any] = {}

    @property
    def model_type(self) -> str | None:
        return self.config_dict.get("model_type")

    def keys(self) -> set[str]:
        """Tensor names, without the rotary `inv_freq` buffers some older checkpoints carry."""
        return {key for key in self.weight_map if not _IGNORED_KEYS.search(key)}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {name}, which remoe does not support")
        return SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        filename = self.weight_map[key]
        if filename not in self._handles:
            self._handles[filename] = safe_open(self.path / filename, framework="pt", device="cpu")
        return self._handles[filename].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def expected_tensor_shapes(config: ReMoEConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(tensor shapes the config implies, names that may be absent): from the model built on the meta device."""
    from .modeling_remoe import ReMoEForCausalLM

    with torch.device("meta"):
        model = ReMoEForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return shapes, optional


def check_weights_match(checkpoint: SafetensorsCheckpoint, shapes: dict, optional: set, where: str) -> None:
    """Raise `CheckpointError` unless the checkpoint holds exactly the tensors (names and shapes) of `shapes`, each
    stored in a floating-point dtype (every weight of these models is one, and an integer tensor would be cast
    silently; only the Hash router's table is integer)."""
    present = checkpoint.keys()
    missing = sorted(set(shapes) - present - optional)
    unexpected = sorted(present - set(shapes))
    if missing:
        raise CheckpointError(
            f"{where}: the weights lack {len(missing)} tensors its config implies, e.g. {missing[:3]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{where}: the weights have {len(unexpected)} tensors its config does not know, e.g. {unexpected[:3]}"
        )
    for key, shape in shapes.items():
        if key in present and checkpoint.shape(key) != shape:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {checkpoint.shape(key)}, its config implies {shape}"
            )
        if key in present and not checkpoint.dtype(key).is_floating_point and not _INTEGER_TENSORS.search(key):
            raise CheckpointError(
                f"{where}: tensor {key!r} is stored as {checkpoint.dtype(key)}; weights must be floating point "
                "(float32, bfloat16, float16 or float64)"
            )


def check_checkpoint(path: str | os.PathLike) -> ReMoEConfig:
    """The config of the ReMoE checkpoint folder `path`, after checking the folder, its config, its safetensors files
    and that the weights are exactly the tensors the config implies. Raises `CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such folder (remoe commands read local checkpoint folders; download a Hub model first, "
            "e.g. with `hf download`)"
        )
    checkpoint = SafetensorsCheckpoint(path)
    if checkpoint.model_type != "remoe":
        raise CheckpointError(
            f"{path / 'config.json'}: model_type is {checkpoint.model_type!r}, not 'remoe' (turn a Llama-family or "
            "Mixtral checkpoint into ReMoE with `remoe convert`)"
        )
    config_file = path / "config.json"
    try:
        config = ReMoEConfig.from_pretrained(path)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise CheckpointError(f"{config_file}: {' '.join(str(error).split())}") from error
    check_config_keys(checkpoint.config_dict, config_file)
    try:
        shapes, optional = expected_tensor_shapes(config)
    except _MODEL_BUILD_ERRORS as error:
        raise CheckpointError(
            f"{config_file}: the model it describes cannot be built ({type(error).__name__}: "
            f"{' '.join(str(error).split())})"
        ) from error
    check_weights_match(checkpoint, shapes, optional, where=str(path))
    return config


@functools.cache
def _known_config_keys() -> frozenset[str]:
    """The keys a ReMoE config.json may hold: those `ReMoEConfig().to_dict()` writes and `_CONFIG_EXTRA_KEYS`."""
    return frozenset(ReMoEConfig().to_dict()) | _CONFIG_EXTRA_KEYS


def check_config_keys(config_dict: dict[str, Any], config_file: str | os.PathLike) -> None:
    """Refuse a key of a ReMoE config.json that is a near miss of a known field (`num_expert`: a typo, which would
    leave the field at its default); warn about other unknown keys, which Transformers keeps as attributes."""
    known = _known_config_keys()
    unknown = sorted(key for key in config_dict if key not in known)
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise CheckpointError(f"{config_file}: unknown key {key!r}; did you mean {close[0]!r}?")
    if unknown:
        logger.warning("%s: keys that ReMoE does not use (kept as attributes): %s", config_file, ", ".join(unknown))


def load_model(path: str | os.PathLike, model_class: type | None = None, **from_pretrained_kwargs):
    """`ReMoEForCausalLM.from_pretrained(path, use_safetensors=True, ...)` after `check_checkpoint(path)`."""
    if model_class is None:
        from .modeling_remoe import ReMoEForCausalLM as model_class
    check_checkpoint(path)
    return model_class.from_pretrained(path, use_safetensors=True, **from_pretrained_kwargs)


def load_any_model(path: str | os.PathLike, **from_pretrained_kwargs):
    """A causal LM of any model type from a local folder, safetensors only: ReMoE through `load_model`, others through
    `AutoModelForCausalLM` with a missing or unexpected weight an error (not just a line in Transformers' report)."""
    checkpoint = SafetensorsCheckpoint(path)
    if checkpoint.model_type == "remoe":
        return load_model(path, **from_pretrained_kwargs)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, output_loading_info=True, **from_pretrained_kwargs
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            names = sorted(str(name) for name in info[kind])
            raise CheckpointError(f"{path}: {kind.replace('_', ' ')} between config and weights, e.g. {names[:3]}")
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local folder, with a one-line error naming the folder when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: no usable tokenizer ({str(error).splitlines()[0]})") from error


def resolve_device(device: str | None) -> str:
    """`device`, or "cuda" when a GPU is there and "cpu" otherwise; a CUDA device that is not there is an error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); e.g. cpu, cuda, cuda:1") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device!r}: this machine has no CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return device


__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "check_checkpoint",
    "check_config_keys",
    "check_weights_match",
    "expected_tensor_shapes",
    "load_any_model",
    "load_model",
    "load_tokenizer",
    "read_safetensors_header",
    "resolve_device",
]


def replace_folder(
    source: str | os.PathLike, target: str | os.PathLike, keep_existing: Callable[[], bool] | None = None
):
    """Publish the finished folder `source` as `target` with one rename. An existing `target` is first moved aside
    (and deleted after), unless `keep_existing()` says to keep it (another process published first: `source` is
    then deleted)."""
    source, target = Path(source), Path(target)
    trash = None
    if os.path.lexists(target):
        if keep_existing is not None and keep_existing():
            shutil.rmtree(source, ignore_errors=True)
            return
        trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
    os.replace(source, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() and not trash.is_symlink() else trash.unlink()
