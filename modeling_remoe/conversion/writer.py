"""Writing a conversion's result: planned tensors streamed into safetensors shards, plus the checkpoint's side files.

A conversion first lists every output tensor as a `PlannedTensor` (name, shape and a function computing it);
`OutputOptions.write` checks the plan against a meta-device ReMoE model, computes the tensors one by one straight into
the shards of a temporary folder, adds the config with `auto_map`, the remote-code files, the first source's tokenizer
and generation config and `remoe_conversion.json`, and renames the folder into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..checkpoints import SAFETENSORS_DTYPES, SafetensorsCheckpoint, replace_folder
from ..configuration_remoe import ReMoEConfig
from ..modeling_remoe import ReMoEForCausalLM

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CONVERSION_INFO_FILE = "remoe_conversion.json"
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Copies of the largest output tensor that exist at once while it is computed (`OutputOptions.check_size`).
_COPIES_PER_TENSOR = 2


@dataclasses.dataclass
class PlannedTensor:
    """One output tensor: its name, shape and a function that computes it (run only once every check has passed)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    dtype: torch.dtype | None = None  # None: the checkpoint dtype


def parse_size(size: int | str) -> int:
    """Bytes (> 0) from an int or a string such as `"5GB"`, `"500MB"`, `"2GiB"`; `ValueError` naming
    `max_shard_size` otherwise."""
    message = f"max_shard_size (--max_shard_size) must be a number of bytes > 0 or like '5GB', got {size!r}"
    if isinstance(size, bool):
        raise ValueError(message)
    if isinstance(size, int):
        if size < 1:
            raise ValueError(message)
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(message)
    base = 1024 if match.group(3) == "IB" else 1000
    parsed = int(float(match.group(1)) * base ** " KMGT".index(match.group(2) or " "))
    if parsed < 1:
        raise ValueError(message)
    return parsed


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """`dtype` (a floating point torch dtype or its name) as a `torch.dtype`; `default` for None."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved


class _StreamingSafetensorsWriter:
    """Writes planned tensors straight into safetensors shards, one tensor at a time.

    Names, shapes and dtypes are known before any tensor is computed, so every shard's header (with the byte offsets)
    is written first and each tensor's bytes are appended as soon as it is computed: no shard is ever held in memory.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_limit: int):
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and shard_bytes + size > shard_limit:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, shape, dtype, size))
            shard_bytes += size
        count = len(shards)
        self.filenames = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.shards = shards
        self.location = {entry[0]: index for index, shard in enumerate(shards) for entry in shard}
        self.total_bytes = sum(entry[3] for shard in shards for entry in shard)
        self._expected: list[str] = []
        self._shard = -1
        self._handle = None

    def _open_shard(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, size in self.shards[index]:
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.folder / self.filenames[index], "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._expected = [entry[0] for entry in self.shards[index]]
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard != self.location[name]:
            self._open_shard(self.location[name])
        if not self._expected or self._expected.pop(0) != name:
            raise RuntimeError(f"{name} written out of plan order")
        self._handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.filenames) > 1:
            weight_map = {name: self.filenames[index] for name, index in sorted(self.location.items())}
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def meta_model(config: ReMoEConfig) -> ReMoEForCausalLM:
    """The model `config` describes on the meta device (shapes only: nothing is allocated)."""
    with torch.device("meta"):
        return ReMoEForCausalLM(config)


def _nearest_existing_folder(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_plan(plan: list[PlannedTensor], model: ReMoEForCausalLM) -> None:
    """The planned tensors must be exactly the model's state dict (tied LM head left out)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    planned = {entry.name: entry.shape for entry in plan}
    if planned != expected:
        missing, extra = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
        wrong = sorted(n for n in set(planned) & set(expected) if planned[n] != expected[n])
        raise RuntimeError(
            f"conversion plan does not match ReMoE: missing {missing[:3]}, extra {extra[:3]}, {wrong[:3]}"
        )


def _copy_side_files(first_source: Path, folder: Path, config: ReMoEConfig) -> None:
    for name in TOKENIZER_FILES:
        if (first_source / name).is_file():
            shutil.copyfile(first_source / name, folder / name)
    if (first_source / "generation_config.json").is_file():
        shutil.copyfile(first_source / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Where and how a conversion writes its result (the keywords every conversion function shares)."""

    output_dir: Path
    dtype: str | torch.dtype | None = None  # None: the first source's embedding dtype
    max_shard_size: int | str = "5GB"
    overwrite: bool = False

    def check(self, sources: Sequence[Path]) -> None:
        """Raise `ValueError` if the output folder is a source, or exists and is not empty without `overwrite`."""
        output_dir, resolved = self.output_dir, self.output_dir.resolve()
        for source in sources:
            if source.resolve() == resolved:
                raise ValueError(f"output_dir {str(output_dir)!r} is one of the sources")
        if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not self.overwrite:
            raise ValueError(
                f"output_dir {str(output_dir)!r} exists and is not empty (pass overwrite=True / --overwrite)"
            )
        parse_size(self.max_shard_size)

    def check_size(self, model: ReMoEForCausalLM, dtype: torch.dtype, description: str, size_flags: str = "") -> None:
        """Refuse, before any tensor is computed, a result that this machine cannot build or store.

        The tensors are computed one at a time, and each briefly exists at least twice (e.g. the expert pieces before
        `torch.stack`, the random router before scaling, the bytes written): the largest one, twice in `dtype` (a lower
        bound: upcycling computes in float32), must fit the available memory. The whole result must fit the free space
        where `output_dir` goes. `model` is the result on the meta device; `size_flags` names the options that set its
        size (e.g. "num_experts (--num_experts) 8").
        """
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        count = sum(math.prod(shape) for shape in shapes.values())
        element_size = torch.empty((), dtype=dtype).element_size()
        total_bytes = count * element_size
        largest = max(shapes, key=lambda name: math.prod(shapes[name]))
        needed = _COPIES_PER_TENSOR * math.prod(shapes[largest]) * element_size
        summary = (
            f"{size_flags + ': ' if size_flags else ''}the converted model ({description}) would have {count / 1e9:,.2f}B "
            f"parameters ({total_bytes / 2**30:,.1f} GiB in {str(dtype).removeprefix('torch.')})"
        )
        available = psutil.virtual_memory().available
        if needed > available:
            raise ValueError(
                f"{summary}; computing its largest tensor {largest} {list(shapes[largest])} needs about "
                f"{needed / 2**30:,.1f} GiB of memory, this machine has {available / 2**30:,.1f} GiB available"
            )
        folder = _nearest_existing_folder(self.output_dir.absolute().parent)
        free = shutil.disk_usage(folder).free
        if total_bytes > free:
            raise ValueError(f"{summary}; {str(folder)!r} has {free / 2**30:,.1f} GiB of free disk space")

    def dtype_for(self, first_source: SafetensorsCheckpoint) -> torch.dtype:
        """The result's dtype: `dtype`, by default the first source's embedding dtype."""
        return resolve_dtype(self.dtype, first_source.dtype("model.embed_tokens.weight"))

    def write(
        self,
        plan: list[PlannedTensor],
        config: ReMoEConfig,
        sources: Sequence[SafetensorsCheckpoint],
        info: dict[str, Any],
        description: str,
        size_flags: str = "",
    ) -> Path:
        """Compute the planned tensors one by one and stream them into safetensors shards; add config, code,
        tokenizer (from `sources[0]`) and `info` as `remoe_conversion.json`. Returns the output folder.

        Before any tensor is computed, the result's size is checked against this machine (`check_size`, with
        `size_flags` naming the options that set it).

        The sources' memory maps are released after every tensor, so resident memory stays near the largest tensor
        being computed (one layer's experts) instead of growing with every source page read.
        """
        dtype, output_dir = self.dtype_for(sources[0]), self.output_dir
        config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = ["ReMoEForCausalLM"]
        model = meta_model(config)
        _check_plan(plan, model)
        shard_limit = parse_size(self.max_shard_size)
        self.check_size(model, dtype, description, size_flags)

        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
        try:
            writer = _StreamingSafetensorsWriter(
                tmp, [(entry.name, entry.shape, entry.dtype or dtype) for entry in plan], shard_limit
            )
            try:
                for entry in tqdm(plan, desc=description, unit="tensor"):
                    tensor = entry.make().to(entry.dtype or dtype)
                    if tuple(tensor.shape) != entry.shape:
                        raise RuntimeError(f"{entry.name}: computed shape {tuple(tensor.shape)}, planned {entry.shape}")
                    writer.write(entry.name, tensor)
                    del tensor
                    for source in sources:
                        source.close()
            finally:
                writer.close()

            custom_object_save(model, tmp, config=config)  # modeling_remoe.py + configuration_remoe.py, auto_map
            config.save_pretrained(tmp)
            _copy_side_files(sources[0].path, tmp, config)
            (tmp / CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            tmp.chmod(0o755)
            replace_folder(tmp, output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote %s (%.1f MB)", output_dir, writer.total_bytes / 1e6)
        return output_dir
