"""Pull → merge → push → pull again over HTTP, through the genuine huggingface_hub client and the loopback Hub
stand-in (tests/hub_server.py). Nothing here uses the offline cache: every expert and dataset file is
downloaded over HTTP into a fresh cache."""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from hub_server import HubStandIn

TOKEN = "hf_PlantedSecretToken0123456789abcdef"


@contextlib.contextmanager
def online():
    """The suite runs with HF_HUB_OFFLINE=1; lift it (in this process) for calls to the loopback stand-in."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@pytest.fixture(scope="module")
def hub(cls_experts, tmp_path_factory):
    """A running stand-in seeded (over HTTP, with the real client) with the experts and the target dataset."""
    from huggingface_hub import HfApi

    root = tmp_path_factory.mktemp("hub")
    with HubStandIn(root / "server") as server:
        with online():
            api = HfApi(endpoint=server.url, token="seed-token")
            for d, path in enumerate(cls_experts["paths"]):
                api.create_repo(f"org/expert-{d}")
                api.upload_folder(repo_id=f"org/expert-{d}", folder_path=str(path))
            api.create_repo("org/target", repo_type="dataset")
            api.upload_folder(repo_id="org/target", repo_type="dataset", folder_path=str(cls_experts["data_dir"]))
        server.runs = []  # every CLI run against it, for the token scan
        yield server


def hub_cli(hub, tmp_path: Path, *args: str, token: str = TOKEN):
    """`hf-glue ARGS` online against the stand-in, with a fresh download cache."""
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
           "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_ETAG_TIMEOUT": "30"}
    proc = run_cli(*args, env=env)
    hub.runs.append((proc, tmp_path))
    return proc


def pull(hub, repo_id: str, cache: Path, revision: str = "main") -> Path:
    from huggingface_hub import snapshot_download

    with online():
        return Path(snapshot_download(repo_id, revision=revision, endpoint=hub.url, cache_dir=cache, token="reader"))


def test_round_trip_over_http(hub, tmp_path):
    out = tmp_path / "merged"
    proc = hub_cli(hub, tmp_path, "merge", "--experts", "org/expert-0", "org/expert-1", "org/expert-2",
                   "--dataset", "org/target", "--steps", "30", "--output-dir", str(out), "--push-to-hub", "org/merged")
    assert proc.returncode == 0, proc.stderr
    assert "Pushed to" in proc.stdout
    # the experts and the data really came over HTTP, pinned to the stand-in's commits
    result = json.loads((out / "merge_result.json").read_text())
    refs = hub.refs("models", "org/expert-0")
    assert result["experts"][0]["revision"] == refs["main"]
    assert result["dataset"]["revision"] == hub.refs("datasets", "org/target")["main"]
    assert (tmp_path / "cache" / "models--org--expert-0").is_dir()

    pulled = pull(hub, "org/merged", tmp_path / "pull")
    from transformers import AutoModelForSequenceClassification

    remote = AutoModelForSequenceClassification.from_pretrained(pulled).state_dict()
    local = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert remote.keys() == local.keys()
    for name in local:
        assert torch.equal(remote[name], local[name]), name

    from huggingface_hub import ModelCard

    card = ModelCard.load(pulled / "README.md")
    assert card.data.base_model == ["org/expert-0", "org/expert-1", "org/expert-2"]
    assert card.data.base_model_relation == "merge"
    for name, value in result["coefficients"].items():
        assert f"| [{name}]" in card.text and f"{value:.4f}" in card.text
    index = card.data.to_dict()["model-index"][0]
    assert index["name"] == "org/merged"
    assert index["results"][0]["metrics"][0]["value"] == pytest.approx(result["eval"]["accuracy"], abs=1e-6)
    assert (pulled / "glue_trajectory.png").is_file() and "glue_trajectory.png" in card.text


def test_push_again_to_a_branch_and_as_a_pr(hub, tmp_path, cls_experts):
    out = tmp_path / "merged"
    proc = hub_cli(hub, tmp_path, "merge", "--experts", "org/expert-0", "org/expert-1", "--dataset", "org/target",
                   "--method", "uniform", "--output-dir", str(out), "--push-to-hub", "org/again")
    assert proc.returncode == 0, proc.stderr
    first = hub.refs("models", "org/again")["main"]
    # again to the existing repo
    proc = hub_cli(hub, tmp_path, "push", str(out), "--repo-id", "org/again", "--commit-message", "second")
    assert proc.returncode == 0, proc.stderr
    assert hub.refs("models", "org/again")["main"] != first
    assert hub.commit("models", "org/again", hub.refs("models", "org/again")["main"])["message"] == "second"
    # to a branch that does not exist yet
    proc = hub_cli(hub, tmp_path, "push", str(out), "--repo-id", "org/again", "--revision", "experiment")
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in hub.files_at("models", "org/again", "experiment")
    assert (pull(hub, "org/again", tmp_path / "p1", revision="experiment") / "merge_result.json").is_file()
    # as a pull request: main does not move, refs/pr/1 holds the files
    main_before = hub.refs("models", "org/again")["main"]
    proc = hub_cli(hub, tmp_path, "push", str(out), "--repo-id", "org/again", "--create-pr")
    assert proc.returncode == 0, proc.stderr
    assert "discussions/1" in proc.stdout
    refs = hub.refs("models", "org/again")
    assert refs["main"] == main_before and "refs/pr/1" in refs
    assert "README.md" in hub.files_at("models", "org/again", "refs/pr/1")


def test_failed_push_keeps_output_and_says_how_to_retry(hub, tmp_path):
    out = tmp_path / "merged"
    hub.fail_commits = True
    try:
        proc = hub_cli(hub, tmp_path, "merge", "--experts", "org/expert-0", "org/expert-1", "--dataset",
                       "org/target", "--steps", "5", "--output-dir", str(out), "--push-to-hub", "org/flaky")
    finally:
        hub.fail_commits = False
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = next(l for l in proc.stderr.splitlines() if "error:" in l)
    assert "org/flaky" in line and "500" in line and "intact" in line
    retry = line.split("retry with: ", 1)[1].strip()
    assert retry == f"hf-glue push {shlex.quote(str(out))} --repo-id org/flaky"
    # the local output is complete
    assert json.loads((out / "merge_result.json").read_text())["coefficients"]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)
    # the printed command works once the server is healthy
    proc = hub_cli(hub, tmp_path, *shlex.split(retry)[1:])
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in hub.files_at("models", "org/flaky")


def test_unreachable_hub_is_one_clear_line(tmp_path, cls_experts):
    out = tmp_path / "merged"
    local = [str(p) for p in cls_experts["paths"][:2]]
    proc = run_cli("merge", "--experts", *local, "--dataset", str(cls_experts["data_dir"]), "--method", "uniform",
                   "--output-dir", str(out), "--push-to-hub", "org/nowhere",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                        "HF_TOKEN": TOKEN})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "retry with: hf-glue push" in proc.stderr and (out / "model.safetensors").is_file()


def test_token_never_appears_in_outputs(hub):
    """Runs above used TOKEN (the stand-in saw it); it must appear in no output, log, or pushed file."""
    assert TOKEN in hub.tokens_seen
    assert hub.runs, "run the other hub tests first (same module)"
    for proc, folder in hub.runs:
        assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
        for path in folder.rglob("*"):
            if path.is_file() and "cache" not in path.relative_to(folder).parts[:1]:
                assert TOKEN.encode() not in path.read_bytes(), path
    for repo_type_dir in (hub.root / "models", hub.root / "datasets"):
        for refs_file in repo_type_dir.rglob("refs.json"):
            repo_id = "/".join(refs_file.parent.relative_to(repo_type_dir).parts)
            for ref in json.loads(refs_file.read_text()):
                for name, data in hub.files_at(repo_type_dir.name, repo_id, ref).items():
                    assert TOKEN.encode() not in data, (repo_id, ref, name)
