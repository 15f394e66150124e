#!/usr/bin/env bash
# The prepared GPU check of the Triton path (issue 12): one command, one H100/H200, no network, at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--dry_run] [--output_dir DIR]      (default DIR: benchmarks/results/gpu_check-<date>)
#
# Steps, each under a hard `timeout` (seconds on the GPU; a step gets less when the 8-minute deadline is nearer):
#   environment        15  versions, GPU, commit                                         -> environment.json
#   cuda_tests        160  pytest tests/test_kernels_cuda.py -k "not autotun", with fixed   -> cuda_tests.json
#                          kernel configs (REMOE_TRITON_DETERMINISTIC=1: one compilation per kernel, not six)
#   experts_bf16       95  bench_experts.py --shapes goal --dtype bf16: T=16k, E=8, mean k=1, H=768/I=3072 and
#                          H=4096/I=16384; triton, grouped_mm, eager and the dense GEMM of the same FLOPs, forward
#                          and forward+backward, TFLOP/s                                    -> bench_experts_bf16.json
#   experts_autocast   60  the same with fp32 leaves under bf16 autocast                    -> bench_experts_autocast.json
#   model_182m         80  bench_model.py, 182m preset, short, bf16 autocast                 -> bench_model_182m.json
#   autotune_tests     65  pytest tests/test_kernels_cuda.py -k autotun (every candidate     -> autotune_tests.json
#                          config compiled and checked; last, as the least needed)
# Sum 475 s. A step past its budget gets SIGINT (then SIGKILL 10 s later): pytest still writes the report of the tests
# it ran, bench_experts.py has written every finished shape. summary.json lists every step: command, exit status (124:
# timed out), seconds, budget; each step's output is in <step>.log. The deadline is 470 s, leaving a few seconds for the
# reports. --dry_run runs the same steps on CPU with tiny shapes and a toy model (Triton under TRITON_INTERPRET=1 in
# the experts benchmark), 120 s per step at most, for CI (tests/test_benchmarks.py).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python}
DRY_RUN=0
OUT=""
while (($#)); do
    case $1 in
        --dry_run) DRY_RUN=1 ;;
        --output_dir) OUT=$2; shift ;;
        --output_dir=*) OUT=${1#*=} ;;
        -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --dry_run, --output_dir DIR)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"

START=$(date +%s)
TOTAL_BUDGET=$((DRY_RUN ? 300 : 470))
DEADLINE=$((START + TOTAL_BUDGET))

# step NAME BUDGET COMMAND...: run COMMAND under `timeout`, its output in NAME.log, one line in steps.tsv
step() {
    local name=$1 budget=$2 left rc start end command
    shift 2
    command=${*//$'\n'/; }
    ((DRY_RUN)) && budget=120
    left=$((DEADLINE - $(date +%s) - 12))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$budget" "$command" >>"$OUT/steps.tsv"
        echo "[gpu_check] $name: skipped, the ${TOTAL_BUDGET} s deadline is reached"
        return
    fi
    start=$(date +%s%N)
    timeout --signal=INT --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $(((end - start) / 1000000)) "$budget" "$command" >>"$OUT/steps.tsv"
    echo "[gpu_check] $name: exit $rc after $(((end - start) / 1000000000)) s (budget $budget s)"
}

# junit_json NAME: NAME.xml (pytest's junit report) -> NAME.json (counts, and the tests that did not pass)
junit_json() {
    "$PYTHON" - "$OUT/$1.xml" "$OUT/$1.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ElementTree
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
report = {"report": source.name, "complete": source.exists()}
if source.exists():
    suite = ElementTree.parse(source).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    report.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    report["passed"] = report["tests"] - report["failures"] - report["errors"] - report["skipped"]
    report["seconds"] = float(suite.get("time", 0))
    report["not_passed"] = [
        {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": child.tag,
         "message": (child.get("message") or "")[:1000]}
        for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error")
    ]
target.write_text(json.dumps(report, indent=2) + "\n")
EOF
}

step environment 15 "$PYTHON" - "$OUT/environment.json" "$DRY_RUN" <<'EOF'
import json, os, platform, subprocess, sys
from importlib import metadata
import torch

def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None

def run(*command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None

gpus = [
    {"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
     "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
    for i in range(torch.cuda.device_count())
]
report = {
    "dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "triton": version("triton"), "transformers": version("transformers"),
    "gpus": gpus, "cpu_count": os.cpu_count(), "host": platform.node(),
    "commit": run("git", "rev-parse", "HEAD"), "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"),
}
open(sys.argv[1], "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF

# pytest with Python's SIGINT handler back in place (a job started in the background inherits SIGINT ignored), so that
# a step stopped by its `timeout` still writes its junit report
pytest=("$PYTHON" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider tests/test_kernels_cuda.py)

step cuda_tests 160 env REMOE_TRITON_DETERMINISTIC=1 "${pytest[@]}" -k "not autotun" --junitxml="$OUT/cuda_tests.xml"
junit_json cuda_tests

if ((DRY_RUN)); then
    experts=(env TRITON_INTERPRET=1 "$PYTHON" benchmarks/bench_experts.py --device cpu --shapes dry_run --warmup 0
        --repeats 1 --implementations triton grouped_mm eager dense)
    printf 'model:\n  hidden_size: 32\n  intermediate_size: 64\n  num_hidden_layers: 2\n  num_attention_heads: 4\n  num_key_value_heads: 2\n  max_position_embeddings: 64\n  num_experts: 4\n  num_experts_per_tok: 1\n' >"$OUT/dry_run_preset.yaml"
    model=("$PYTHON" benchmarks/bench_model.py --presets "$OUT/dry_run_preset.yaml" --device cpu --batch_size 2 --seq_len 16
        --decode_tokens 2 --repeats 1 --calibration_steps 1 --vocab_size 64 --models remoe-relu
        --transformers_implementations eager grouped_mm)
else
    experts=("$PYTHON" benchmarks/bench_experts.py --shapes goal --implementations triton grouped_mm eager dense)
    model=("$PYTHON" benchmarks/bench_model.py --presets 182m --batch_size 8 --seq_len 512 --decode_tokens 8 --repeats 3
        --calibration_steps 60 --models remoe-relu remoe-topk mixtral --transformers_implementations eager grouped_mm)
fi
step experts_bf16 95 "${experts[@]}" --dtype bf16 --output "$OUT/bench_experts_bf16.json"
step experts_autocast 60 "${experts[@]}" --dtype fp32 --autocast bf16 --output "$OUT/bench_experts_autocast.json"
step model_182m 80 "${model[@]}" --autocast bf16 --output "$OUT/bench_model_182m.json"

step autotune_tests 65 "${pytest[@]}" -k autotun --junitxml="$OUT/autotune_tests.xml"
junit_json autotune_tests

"$PYTHON" - "$OUT" "$START" <<'EOF'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, milliseconds, budget, command = line.split("\t", 4)
    steps.append({
        "step": name, "exit_status": None if status == "skipped" else int(status), "skipped": status == "skipped",
        "timed_out": status in ("124", "137"), "seconds": int(milliseconds) / 1000, "budget_s": int(budget), "command": command,
    })
files = sorted(path.name for path in out.glob("*.json") if path.name != "summary.json")
summary = {"wall_s": round(time.time() - int(sys.argv[2]), 1), "ok": all(s["exit_status"] == 0 for s in steps),
           "steps": steps, "files": files}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"[gpu_check] {'all steps passed' if summary['ok'] else 'some steps failed'} in {summary['wall_s']} s: {out}")
EOF
