"""The JSON files written next to a checkpoint, one typed record each: their keys are defined here and nowhere else.

| file | written by | record |
|---|---|---|
| `metrics.json` | `remoe train` | `TrainingMetrics` |
| `eval_results.json` | `remoe eval` | `EvalResults` |
| `routing_analysis.json` | `remoe analyze` | `RoutingAnalysis` |

A writer turns the dict it computed into its record with `from_dict(values, strict=True)`, which refuses a key the
record does not define and a key its writer always writes that is missing, then calls `write`. Readers call
`read(folder)`: None for a missing or unreadable file, None (or empty) for each absent key, keys the record does not
define kept in `extra`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

_R = TypeVar("_R", bound="_Record")


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclasses.dataclass(kw_only=True)
class _Record:
    """A JSON object whose keys are the dataclass fields (in file order), plus `extra` for keys it does not define.

    Its writer writes every field (null where there is no value) but those named in `OPTIONAL`, written only when they
    have a value, and those `_not_written` leaves out."""

    FILENAME: ClassVar[str]
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls: type[_R], values: Mapping[str, Any], *, strict: bool = False) -> _R:
        """The record of `values`; `strict` (writers): every key defined by the record, every required key given."""
        names = {field.name for field in dataclasses.fields(cls)} - {"extra"}
        known = {key: value for key, value in values.items() if key in names}
        rest = {key: value for key, value in values.items() if key not in names}
        known.update(cls._take_flattened(rest))
        record = cls(**known, extra=rest)
        if strict:
            problems = [f"{key!r} is not one of its keys" for key in rest]
            problems += [f"{key!r} is missing" for key in record.required_keys() if key not in values]
            if problems:
                raise ValueError(f"{cls.FILENAME} ({cls.__name__}): " + "; ".join(problems))
        return record

    @classmethod
    def read(cls: type[_R], folder: str | Path) -> _R | None:
        """The record in `folder`, None when its file is missing or unreadable."""
        data = read_json_object(Path(folder) / cls.FILENAME)
        return None if data is None else cls.from_dict(data)

    @classmethod
    def load(cls: type[_R], folder: str | Path) -> _R:
        """The record in `folder`; `OSError` / `ValueError` when its file is missing or is not a JSON object."""
        path = Path(folder) / cls.FILENAME
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls.from_dict(data)

    def required_keys(self) -> list[str]:
        """The keys its writer writes for a record like this one."""
        left_out = {"extra", *self.OPTIONAL, *self._not_written()}
        return [field.name for field in dataclasses.fields(self) if field.name not in left_out]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the required keys, the other fields that have a value, then `extra`."""
        required = self.required_keys()
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "extra" and (value is not None or field.name in required):
                values.update(self._flatten(field.name, value))
        values.update(self.extra)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the record to `path`, or to `path/FILENAME` when `path` is a folder; return the file."""
        path = Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        path.write_text(self.to_json())
        return path

    def _not_written(self) -> tuple[str, ...]:
        """Fields its writer leaves out of a record like this one."""
        return ()

    @classmethod
    def _take_flattened(cls, rest: dict[str, Any]) -> dict[str, Any]:
        """Fields stored as several keys, built from (and removed from) the keys no field is named after."""
        return {}

    def _flatten(self, name: str, value: Any) -> dict[str, Any]:
        """The keys of field `name`."""
        return {name: value}


@dataclasses.dataclass(frozen=True)
class ValidationSplit:
    """Loss and perplexity of one validation domain."""

    loss: float | None = None
    perplexity: float | None = None


_DOMAIN_KEY = re.compile(r"^validation_(?P<domain>.+)_(?P<stat>loss|perplexity)$")
_LAYER_KEY = re.compile(r"^validation_sparsity_layer_(?P<layer>\d+)$")


@dataclasses.dataclass(kw_only=True)
class TrainingMetrics(_Record):
    """`metrics.json`: what `remoe train` measured at the end of training.

    Every run has the validation loss and perplexity (of all domains together and per domain, as
    `validation_DOMAIN_loss` / `validation_DOMAIN_perplexity`), the seed, steps, loss, time, throughput and parameter
    counts. Models with experts add the inference routing of the validation blocks (per layer as
    `validation_sparsity_layer_N`), the training sparsity of the last 10% of steps when it was logged and
    `target_sparsity` (null for TopK); ReLU-routed ones the final L1 coefficient.
    """

    FILENAME: ClassVar[str] = "metrics.json"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("validation_domains", "validation_sparsity_by_layer", "train_sparsity_final")
    WITH_EXPERTS: ClassVar[tuple[str, ...]] = ("validation_sparsity", "validation_experts_per_token", "target_sparsity")
    WITH_L1: ClassVar[tuple[str, ...]] = ("l1_coef",)

    router_type: str | None = None
    validation_loss: float | None = None
    validation_perplexity: float | None = None
    validation_domains: dict[str, ValidationSplit] = dataclasses.field(default_factory=dict)
    validation_sparsity: float | None = None
    validation_experts_per_token: float | None = None
    validation_sparsity_by_layer: dict[int, float] = dataclasses.field(default_factory=dict)
    train_sparsity_final: float | None = None
    target_sparsity: float | None = None
    l1_coef: float | None = None
    seed: int | None = None
    train_steps: int | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    total_parameters: int | None = None
    active_parameters: int | None = None

    def _not_written(self) -> tuple[str, ...]:
        left_out: tuple[str, ...] = ()
        if self.router_type is None or self.router_type == "dense":
            left_out += self.WITH_EXPERTS
        if self.router_type != "relu":
            left_out += self.WITH_L1
        return left_out

    @classmethod
    def _take_flattened(cls, rest: dict[str, Any]) -> dict[str, Any]:
        domains: dict[str, dict[str, float]] = {}
        layers: dict[int, float] = {}
        for key in list(rest):
            if match := _LAYER_KEY.match(key):
                layers[int(match["layer"])] = rest.pop(key)
            elif match := _DOMAIN_KEY.match(key):
                domains.setdefault(match["domain"], {})[match["stat"]] = rest.pop(key)
        splits = {domain: ValidationSplit(**stats) for domain, stats in domains.items()}
        return {"validation_domains": splits, "validation_sparsity_by_layer": layers}

    def _flatten(self, name: str, value: Any) -> dict[str, Any]:
        if name == "validation_domains":
            keys: dict[str, Any] = {}
            for domain, split in value.items():
                keys.update(
                    (f"validation_{domain}_{stat}", getattr(split, stat))
                    for stat in ("loss", "perplexity")
                    if getattr(split, stat) is not None
                )
            return keys
        if name == "validation_sparsity_by_layer":
            return {f"validation_sparsity_layer_{layer}": sparsity for layer, sparsity in value.items()}
        return {name: value}


@dataclasses.dataclass(kw_only=True)
class EvalResults(_Record):
    """`eval_results.json`: the lm-evaluation-harness results of `remoe eval` (`results` per task, `groups`) with the
    run's `config` and `versions`, and for the local tasks the statistics of the scored text per corpus domain
    (`domains`) and its routing over all of it (`routing`)."""

    FILENAME: ClassVar[str] = "eval_results.json"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("groups", "domains", "routing")

    model: str | None = None
    date: str | None = None
    versions: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    results: dict[str, dict[str, Any]] | None = None
    n_samples: dict[str, dict[str, int]] | None = None
    task_versions: dict[str, Any] | None = None
    groups: dict[str, dict[str, Any]] | None = None
    domains: dict[str, dict[str, Any]] | None = None
    routing: dict[str, Any] | None = None

    @property
    def limit(self) -> int | None:
        """Documents per task (None: all)."""
        return (self.config or {}).get("limit")

    @property
    def num_fewshot(self) -> int | None:
        return (self.config or {}).get("num_fewshot")

    @property
    def lm_eval_version(self) -> str | None:
        return (self.versions or {}).get("lm_eval")


@dataclasses.dataclass(kw_only=True)
class RoutingAnalysis(_Record):
    """`routing_analysis.json`: the routing of held-out text measured by `remoe analyze` (`layers`: one object per MoE
    layer with its sparsity, load and `dead_experts`), and the names of the figures written next to it."""

    FILENAME: ClassVar[str] = "routing_analysis.json"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("dead_expert_threshold", "top_tokens", "routing_stability")

    router_type: str | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    target_sparsity: float | None = None
    num_tokens: int | None = None
    sparsity: float | None = None
    experts_per_token: float | None = None
    layers: list[dict[str, Any]] | None = None
    frequency_correlation: dict[str, Any] | None = None
    # What `dead_experts` means (`fraction_of_balanced_load`, `description`); absent in files written before it.
    dead_expert_threshold: dict[str, Any] | None = None
    # `layer` (an MoE layer index) and, per expert, its most frequent tokens (`token_id`, `token`, `count`, ...).
    top_tokens: dict[str, Any] | None = None
    # Against `compare_to`: `flip_rate` (overall) and `flip_rate_per_layer` of the (token, layer) routing decisions.
    routing_stability: dict[str, Any] | None = None
    figures: list[str] | None = None

    @property
    def correlation(self) -> Any:
        """Pearson correlation of log token frequency with experts per token (`frequency_correlation.value`)."""
        return (self.frequency_correlation or {}).get("value")

    @property
    def dead_experts(self) -> list[list[int]]:
        """Per layer, the dead experts: under 1/64 of the tokens a perfectly balanced expert would get."""
        return [layer.get("dead_experts") or [] for layer in self.layers or [] if isinstance(layer, dict)]


def parameter_counts(model) -> dict[str, int]:
    """`total_parameters` and `active_parameters` (per token: k of E experts, embeddings included) of `model`."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    config = model.config
    active = total - experts + experts * config.num_experts_per_tok // config.num_experts
    return {"total_parameters": total, "active_parameters": active}
