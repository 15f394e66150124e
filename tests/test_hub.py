"""`remoe push`: the repository folder, its model card, remote-code loading without `remoe`, and the upload through
huggingface_hub's real client against a recording HTTP server on 127.0.0.1."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import remoe_cli
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import remoe
from remoe.hub_cards.push import REMOTE_CODE_FILES, check_remote_code, format_number

from .eval_helpers import random_checkpoint, trained_checkpoint

REPO_ID = "acme/tiny-remoe"
SUBPROCESS_TIMEOUT = 240


pytestmark = pytest.mark.usefixtures("one_thread")


def remoe_push(argv: list[str]) -> int:
    """`remoe push ARGV` through the real command line."""
    return remoe_cli.main(["push", *argv])


def _subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A trained checkpoint (remoe train) with real eval results (remoe eval) next to it."""
    import lm_eval.evaluator

    from remoe.training.evaluation import evaluate_checkpoint

    folder = tmp_path_factory.mktemp("hub") / "tiny-remoe"
    shutil.copytree(trained_checkpoint(tmp_path_factory), folder)
    add_env_info, lm_eval.evaluator.add_env_info = lm_eval.evaluator.add_env_info, lambda results: None
    try:
        evaluate_checkpoint(folder, "remoe_arith,remoe_ppl_docs", limit=2, batch_size=4, verbose=False)
    finally:
        lm_eval.evaluator.add_env_info = add_env_info
    return folder


@pytest.fixture(scope="module")
def repo_folder(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "repo"
    argv = [str(model_dir), "--repo_id", REPO_ID, "--dry_run", str(out), "--max_shard_size", "100KB"]
    assert remoe_push(argv) == 0
    return out


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_dry_run_writes_the_hub_repository_layout(repo_folder, model_dir):
    files = {str(p.relative_to(repo_folder)) for p in repo_folder.rglob("*") if p.is_file()}
    shards = sorted(name for name in files if name.startswith("model-") and name.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    expected = {
        "README.md",
        "config.json",
        *REMOTE_CODE_FILES,
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.json",
        "eval_results.json",
        "run_config.yaml",
        "training_curves.png",
        "model.safetensors.index.json",
        *shards,
    }
    assert files == expected  # no training_args.bin (pickle), no checkpoint-*/ or runs/
    tokenizer_config = json.loads((repo_folder / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(
        tokenizer_config
    )  # how we loaded it, whatever HF_HUB_OFFLINE says
    config = json.loads((repo_folder / "config.json").read_text())
    assert config["model_type"] == "remoe"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_remoe.ReMoEConfig",
        "AutoModelForCausalLM": "modeling_remoe.ReMoEForCausalLM",
    }
    for name in ("metrics.json", "eval_results.json", "training_curves.png"):
        assert (repo_folder / name).read_bytes() == (model_dir / name).read_bytes()


def test_card_metadata_parses_and_its_numbers_equal_the_metrics_files(repo_folder, model_dir):
    metadata, body = _card(repo_folder)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    evals = json.loads((model_dir / "eval_results.json").read_text())

    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"remoe", "mixture-of-experts", "custom_code"} <= set(metadata["tags"])
    assert "datasets" not in metadata  # trained on local files: no Hub dataset to name
    summary = metadata["remoe"]
    for key in ("l1_coef", "train_sparsity_final", "validation_sparsity", "target_sparsity"):
        assert summary[key] == metrics[key], key
    assert summary["total_parameters"] == metrics["total_parameters"]
    assert summary["active_parameters"] == metrics["active_parameters"]  # recomputed from the weights

    (entry,) = metadata["model-index"]
    reported = {
        (result["dataset"]["type"], metric["type"]): metric["value"]
        for result in entry["results"]
        for metric in result["metrics"]
    }
    expected = {
        (task, metric): value
        for task, values in evals["results"].items()
        for metric, value in values.items()
        if not metric.endswith("_stderr")
    }
    assert reported == expected and len(expected) == 5  # acc, acc_norm + 3 perplexity metrics
    assert all(result["dataset"]["args"] == {"limit": 2} for result in entry["results"])
    card = ModelCard((repo_folder / "README.md").read_text())  # the Hub's own parser
    assert len(card.data.eval_results) == 5 and card.data.model_name == "tiny-remoe"

    for key in ("l1_coef", "train_sparsity_final", "validation_sparsity", "train_loss"):
        assert format_number(metrics[key]) in body, key
    for domain in ("code", "docs", "math"):
        loss = format_number(metrics[f"validation_{domain}_loss"])
        ppl = format_number(metrics[f"validation_{domain}_perplexity"])
        assert f"| {domain} | {loss} | {ppl} |" in body
    assert f"({metrics['total_parameters']:,})" in body and f"({metrics['active_parameters']:,})" in body
    assert "| Experts per MoE layer (E) | 4 |" in body and "| Granularity (G) | 1 |" in body
    assert f"| remoe_arith | acc | {format_number(evals['results']['remoe_arith']['acc'])} |" in body
    docs = evals["domains"]["docs"]
    assert format_number(docs["token_perplexity"]) in body and format_number(docs["routing_sparsity"]) in body
    assert "![training curves](training_curves.png)" in body
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    assert "model.update_l1_coef()" in body and "model.generate(" in body


def test_card_leaves_out_what_is_missing(tmp_path):
    bare = random_checkpoint(tmp_path / "bare")
    out = tmp_path / "repo"
    assert remoe_push([str(bare), "--repo_id", "acme/bare", "--dry_run", str(out)]) == 0
    metadata, body = _card(out)
    assert "model-index" not in metadata and "datasets" not in metadata
    assert set(metadata["remoe"]) <= {
        "router_type",
        "num_experts",
        "num_experts_per_tok",
        "granularity",
        "total_parameters",
        "active_parameters",
        "l1_coef",
    }
    assert "## Training" not in body and "## Evaluation" not in body and "![" not in body
    assert "## Architecture" in body and "## Usage" in body
    assert {p.name for p in out.iterdir()} >= {"README.md", "model.safetensors", "modeling_remoe.py"}


def test_card_uses_run_config_and_routing_analysis_when_present(repo_folder, tmp_path):
    """`run_config.yaml` (the resolved preset) and a `remoe analyze` folder next to the checkpoint go into the card."""
    bare = random_checkpoint(tmp_path / "model")
    run = {
        "model": {"router_type": "relu"},
        "data": {"dataset": "HuggingFaceFW/fineweb-edu", "block_size": 128},
        "training": {"learning_rate": 3e-4, "per_device_train_batch_size": 8, "lr_scheduler_type": "cosine"},
    }
    (bare / "run_config.yaml").write_text(yaml.safe_dump(run))
    analysis = bare / "analysis"
    analysis.mkdir()
    summary = {"num_tokens": 4096, "sparsity": 0.7421875, "experts_per_token": 1.03125, "figures": ["sparsity.png"]}
    (analysis / "routing_analysis.json").write_text(json.dumps(summary))
    shutil.copy(repo_folder / "training_curves.png", analysis / "sparsity.png")

    out = tmp_path / "repo"
    assert remoe_push([str(bare), "--repo_id", "acme/with-analysis", "--dry_run", str(out)]) == 0
    metadata, body = _card(out)
    assert metadata["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert "| Data | HuggingFaceFW/fineweb-edu |" in body and "| Sequence length | 128 |" in body
    assert "| Peak learning rate | 0.0003 |" in body and "| LR schedule | cosine |" in body
    assert (out / "analysis" / "routing_analysis.json").read_text() == json.dumps(summary)
    assert (out / "analysis" / "sparsity.png").is_file() and (out / "run_config.yaml").is_file()
    assert "## Routing analysis" in body and "| Sparsity | 0.7422 |" in body
    assert "![sparsity](analysis/sparsity.png)" in body


REMOTE_LOAD = textwrap.dedent(
    """
    import sys

    sys.modules["remoe"] = None  # the package is not importable here: only the repository's own code runs
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    class RefusingUnpickler(pickle.Unpickler):
        load = refuse

    class RefusingPythonUnpickler(pickle._Unpickler):  # keeps `dispatch`, which importers (sklearn) read
        load = refuse

    torch.load = pickle.load = pickle.loads = refuse
    pickle.Unpickler, pickle._Unpickler = RefusingUnpickler, RefusingPythonUnpickler
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    ids = tokenizer("def add(a, b):\\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    save_file({"ids": ids, "logits": logits.contiguous(), "generated": generated}, out)
    """
)


def test_pushed_folder_loads_with_remote_code_without_remoe(repo_folder, model_dir, tmp_path):
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_LOAD)
    out = tmp_path / "remote.safetensors"
    result = subprocess.run(
        [sys.executable, str(script), str(repo_folder), str(out)],
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = load_file(out)
    local = remoe.ReMoEForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(remote["ids"]).logits, remote["logits"], rtol=1e-5, atol=1e-5)
        expected = local.generate(remote["ids"], max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, remote["generated"])


def test_remote_code_is_model_code_only(repo_folder, tmp_path):
    for name in REMOTE_CODE_FILES:
        assert check_remote_code(repo_folder / name) == [], name
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent(
            """
            import os
            import subprocess
            import socket
            import requests
            from urllib.request import urlopen
            import torch
            import remoe.kernels
            from torch.hub import download_url_to_file

            try:
                import remoe.kernels as kernels
            except ImportError:
                kernels = None

            def forward(x):
                open("/etc/passwd").read()
                subprocess.run(["ls"])
                torch.load("weights.bin")
                eval("1 + 1")
                torch.nn.Module.from_pretrained("evil/model")
                return x
            """
        )
    )
    problems = "\n".join(check_remote_code(bad))
    for needle in (
        "import os",
        "import subprocess",
        "import socket",
        "import requests",
        "urllib",
        "bad.py:8",
        "torch.hub",
    ):
        assert needle in problems, needle
    for needle in ("uses open", "uses .load", "uses eval", "uses .from_pretrained"):
        assert needle in problems, needle
    assert "bad.py:12" not in problems  # remoe inside try/except ImportError is fine
    assert not [p for p in repo_folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


class RecordingHub:
    """A bounded stand-in for the Hub API on 127.0.0.1 that records every request: create repo, YAML validation,
    preupload, LFS batch + upload, commit. Enough for `HfApi.create_repo`/`upload_folder` and `push_to_hub`."""

    def __init__(self):
        self.requests, self.created, self.commits, self.lfs_uploads, self.cards = [], {}, {}, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                status, payload = hub.route(self.command, path, body)
                data = b"" if self.command == "HEAD" else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            self.created[f"{request['organization']}/{request['name']}"] = request
            return 200, {"url": f"{self.url}/{request['organization']}/{request['name']}"}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            self.cards.append(content)
            yaml.safe_load(content.split("---\n")[1])
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png")) else "regular"}
                for f in files
            ]
            return 200, {"files": [{**mode, "shouldIgnore": False} for mode in modes]}
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [
                {**obj, "authenticated": True, "actions": {"upload": {"href": f"{self.url}/lfs/{obj['oid']}"}}}
                for obj in objects
            ]
            return 200, {"transfer": "basic", "objects": actions}
        if method == "PUT" and path.startswith("/lfs/"):
            self.lfs_uploads[path.removeprefix("/lfs/")] = hashlib.sha256(body).hexdigest()
            return 200, {}
        if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            self.commits[repo] = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": f"{method} {path} is not recorded by this test server"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


UPLOAD = textwrap.dedent(
    """
    import sys

    import remoe_cli
    from remoe import ReMoEForCausalLM

    model_dir, repo_id = sys.argv[1], sys.argv[2]
    argv = ["push", model_dir, "--repo_id", repo_id, "--private", "--max_shard_size", "100KB"]
    assert remoe_cli.main(argv) == 0
    ReMoEForCausalLM.from_pretrained(model_dir).push_to_hub("acme/plain-push-to-hub")
    """
)


def test_upload_through_the_huggingface_hub_client(model_dir, repo_folder, tmp_path):
    script = tmp_path / "upload.py"
    script.write_text(UPLOAD)
    with RecordingHub() as hub:
        env = _subprocess_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_XET="1")
        result = subprocess.run(
            [sys.executable, str(script), str(model_dir), REPO_ID],
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"pushed {model_dir} to {REPO_ID}" in result.stdout

    assert hub.created[REPO_ID] == {
        "name": "tiny-remoe",
        "organization": "acme",
        "visibility": "private",
        "type": "model",
    }
    assert all(auth == "Bearer hf_test_token" for method, path, auth in hub.requests if path.startswith("/api/"))
    lines = hub.commits[REPO_ID]
    committed = {line["value"]["path"]: line for line in lines if line["key"] in ("file", "lfsFile")}
    expected = {str(p.relative_to(repo_folder)) for p in repo_folder.rglob("*") if p.is_file()}
    assert set(committed) == expected
    for name, line in committed.items():
        local = (repo_folder / name).read_bytes()
        if line["key"] == "lfsFile":  # uploaded through LFS, content checked by hash
            assert line["value"]["oid"] == hashlib.sha256(local).hexdigest() == hub.lfs_uploads[line["value"]["oid"]]
        else:
            assert base64.b64decode(line["value"]["content"]) == local, name
    assert any(name.endswith(".safetensors") and line["key"] == "lfsFile" for name, line in committed.items())

    # `push_to_hub` from Transformers keeps working, with the remote code next to the weights.
    plain = {line["value"]["path"] for line in hub.commits["acme/plain-push-to-hub"] if "path" in line["value"]}
    assert {"config.json", "model.safetensors", *REMOTE_CODE_FILES} <= plain


@pytest.mark.parametrize("repo_id", ["no-namespace", "acme/bad name", "acme/a--b", "acme/x/y", "acme/name.git"])
def test_bad_repo_id_fails_before_any_request(model_dir, monkeypatch, capsys, repo_id):
    import huggingface_hub.constants

    with RecordingHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        assert remoe_push([str(model_dir), "--repo_id", repo_id]) == 2
    assert "repo_id must look like ORG/NAME" in capsys.readouterr().err
    assert hub.requests == []


def test_missing_token_fails_before_any_request(model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with RecordingHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert remoe_push([str(model_dir), "--repo_id", REPO_ID]) == 2
    message = capsys.readouterr().err
    assert "no Hugging Face token" in message and "HF_TOKEN" in message
    assert hub.requests == []


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    assert remoe_push([str(tmp_path / "nope"), "--repo_id", REPO_ID, "--dry_run", str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_remote_code_that_is_not_model_only_fails_before_anything_is_written(model_dir, tmp_path, monkeypatch, capsys):
    """The model's own source files are checked before the repository folder is written (here the check is made to
    find a problem in modeling_remoe.py)."""
    from remoe.hub_cards import upload

    checked = []

    def check(path):
        checked.append(Path(path))
        return [f"{Path(path).name}:1: uses .load"] if Path(path).name == "modeling_remoe.py" else []

    monkeypatch.setattr(upload, "check_remote_code", check)
    out = tmp_path / "out"
    assert remoe_push([str(model_dir), "--repo_id", REPO_ID, "--dry_run", str(out)]) == 2
    assert "remote code is not model-only code: modeling_remoe.py:1: uses .load" in capsys.readouterr().err
    assert not out.exists()
    assert {path.name for path in checked} == {"configuration_remoe.py", "modeling_remoe.py"}
    assert all(path.parent == Path(remoe.modeling_remoe.__file__).parent for path in checked)
