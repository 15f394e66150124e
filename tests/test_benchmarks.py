"""The model benchmark runs end to end on a toy size, resident and swapped, and reports every contestant."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_DIMS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("swap_models", ["never", "always"])
def test_bench_model_reports_every_contestant(tmp_path, swap_models):
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({"model": TINY_DIMS}))
    output = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--presets", str(preset)]
    command += ["--batch_size", "2", "--seq_len", "16", "--decode_tokens", "3", "--repeats", "2"]
    command += ["--calibration_steps", "2", "--vocab_size", "64", "--device", "cpu", "--swap_models", swap_models]
    command += ["--transformers_implementations", "eager", "grouped_mm", "--output", str(output)]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    payload = json.loads(output.read_text())
    rows = {(row["model"], row["experts"]): row for row in payload["results"]}
    expected_models = ("remoe-relu", "remoe-topk", "mixtral", "qwen3-moe")
    assert set(rows) == {(model, experts) for model in expected_models for experts in ("eager", "grouped_mm")}
    for (model, _), row in rows.items():
        assert "error" not in row, row
        assert row["swapped"] is (swap_models == "always")
        for key in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert row[key] > 0
        assert ("experts_per_token" in row) is model.startswith("remoe")
    assert rows[("remoe-topk", "eager")]["experts_per_token"] == 1.0
    assert rows[("remoe-relu", "eager")]["calibration_steps"] in (1, 2)
