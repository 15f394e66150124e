"""`keep_freed_memory`: glibc keeps freed multi-MB blocks (no page faults on reuse); `remoe train` applies it first."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from remoe.training import allocator
from remoe.training import train as train_module
from remoe.training.cli import main

ON_GLIBC = allocator._glibc() is not None and allocator._malloc_is_glibc(allocator._glibc())

REUSE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from remoe.training.allocator import keep_freed_memory

    applied = keep_freed_memory() if sys.argv[1] == "call" else None
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 << 20)  # 64 MiB, every page written
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)


def _clean_environment() -> dict:
    drop = {allocator.DISABLE_VARIABLE, "GLIBC_TUNABLES", *allocator.GLIBC_MALLOC_VARIABLES}
    return {key: value for key, value in os.environ.items() if key not in drop} | {"OMP_NUM_THREADS": "1"}


def _reuse_faults(mode: str, environment: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", REUSE_SCRIPT, mode], env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not ON_GLIBC, reason="glibc malloc only")
def test_freed_64_mib_blocks_are_reused_without_page_faults():
    """Without the settings every 64 MiB block is a fresh mmap (at least 32 faults even with 2 MiB pages); with them,
    once the heap has grown to its working size, allocating and freeing the block again faults nothing in."""
    environment = _clean_environment()
    default = _reuse_faults("none", environment)["faults"][-10:]
    assert min(default) >= 32, default

    kept = _reuse_faults("call", environment)
    assert kept["applied"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1, "M_TOP_PAD": 64 << 20}
    assert sum(kept["faults"][-10:]) <= 16, kept["faults"]

    switched_off = _reuse_faults("call", environment | {allocator.DISABLE_VARIABLE: "0"})
    assert switched_off["applied"] == {} and min(switched_off["faults"][-10:]) >= 32, switched_off


@pytest.fixture
def recorded_mallopt(monkeypatch):
    """mallopt calls recorded instead of made (the test process keeps glibc's defaults)."""
    calls = []
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_mallopt", lambda libc, parameter, value: calls.append((parameter, value)) or True)
    for name in (allocator.DISABLE_VARIABLE, "GLIBC_TUNABLES", *allocator.GLIBC_MALLOC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.skipif(not ON_GLIBC, reason="glibc malloc only")
def test_sets_the_parameters_it_reports_once(recorded_mallopt):
    applied = allocator.keep_freed_memory()
    assert applied == {name: value for name, (_, value) in allocator.SETTINGS.items()}
    assert recorded_mallopt == [
        (allocator.M_MMAP_MAX, 0),
        (allocator.M_TRIM_THRESHOLD, -1),
        (allocator.M_TOP_PAD, 64 << 20),
    ]
    assert allocator.keep_freed_memory() == applied and len(recorded_mallopt) == 3  # a second call changes nothing


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        (allocator.DISABLE_VARIABLE, "0", "REMOE_KEEP_FREED_MEMORY=0"),
        ("MALLOC_ARENA_MAX", "2", "MALLOC_ARENA_MAX"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0", "GLIBC_TUNABLES"),
    ],
)
def test_switched_off_by_the_environment_with_a_log_line(
    recorded_mallopt, monkeypatch, caplog, variable, value, reason
):
    monkeypatch.setenv(variable, value)
    with caplog.at_level(logging.INFO, logger=allocator.__name__):
        assert allocator.keep_freed_memory() == {}
    assert recorded_mallopt == [] and reason in caplog.text


def test_no_op_off_glibc_with_a_log_line(recorded_mallopt, monkeypatch, caplog):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with caplog.at_level(logging.INFO, logger=allocator.__name__):
        assert allocator.keep_freed_memory() == {}
    assert recorded_mallopt == [] and "not glibc" in caplog.text


class _Stop(ValueError):
    pass


@pytest.mark.skipif(not ON_GLIBC, reason="glibc malloc only")
@pytest.mark.parametrize("switched_off", [False, True])
def test_remoe_train_applies_it_before_anything_else(recorded_mallopt, monkeypatch, capsys, switched_off):
    if switched_off:
        monkeypatch.setenv(allocator.DISABLE_VARIABLE, "0")
    stages = []

    def plan_run(options):
        stages.append(list(recorded_mallopt))
        raise _Stop("stopped after start-up")

    monkeypatch.setattr(train_module, "plan_run", plan_run)
    assert main(["train", "--max_steps", "1"]) == 2
    assert "stopped after start-up" in capsys.readouterr().err
    assert stages == [[] if switched_off else [(parameter, value) for parameter, value in allocator.SETTINGS.values()]]
