"""Output safety: nothing the tool did not write is deleted, inputs are never output, unsafe locations and
non-finite weights are refused before anything is written, and interrupted writes leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import HUB_CACHE
from hf_glue.commands import main
from hf_glue.errors import GlueError

TWO = ["--experts", "org/expert-0", "org/expert-1"]


def _merge(out: Path, *extra: str) -> list[str]:
    return ["merge", *TWO, "--dataset", "org/target", "--method", "uniform", "--output-dir", str(out), *extra]


def _blend(out: Path, *extra: str) -> list[str]:
    return ["blend", *TWO, "--weights", "0.5", "0.5", "--output-dir", str(out), *extra]


def _error(capsys) -> str:
    """The one error line the last command printed (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.glob(".*") if "partial" in p.name or ".old-" in p.name]


def _forbid_search(monkeypatch) -> None:
    """Checks must refuse before the search: a run that reaches a method fails the test."""
    import hf_glue.pipeline

    def search(*args, **kwargs):
        raise AssertionError("the search ran before the output was checked")

    monkeypatch.setattr(hf_glue.pipeline, "run_method", search)


@pytest.fixture
def no_search(monkeypatch):
    _forbid_search(monkeypatch)


def test_overwrite_refuses_a_folder_of_user_files(cls_experts, tmp_path, capsys, no_search):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_merge(out, "--overwrite-output-dir")) == 1
    assert "'keep.txt'" in _error(capsys)
    assert (out / "keep.txt").read_text() == "mine" and os.listdir(out) == ["keep.txt"]
    _no_leftovers(tmp_path)


def test_overwrite_replaces_only_a_previous_output(cls_experts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_merge(out)) == 0
    result = json.loads((out / "merge_result.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert result["files"] == on_disk and "model.safetensors" in on_disk
    umask = os.umask(0)
    os.umask(umask)
    for name in on_disk:  # the user's usual permissions (safetensors alone would give 0600)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    capsys.readouterr()

    (out / "notes.txt").write_text("mine")  # a file hf-glue did not write
    assert main(_merge(out, "--overwrite-output-dir")) == 1
    assert "'notes.txt'" in _error(capsys) and (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    assert main(_merge(out, "--overwrite-output-dir")) == 0
    capsys.readouterr()

    # an output of an older version (no "files" list) is recognised by the names hf-glue writes
    result = json.loads((out / "merge_result.json").read_text())
    del result["files"]
    (out / "merge_result.json").write_text(json.dumps(result))
    (out / "data.csv").write_text("mine")
    assert main(_merge(out, "--overwrite-output-dir")) == 1
    assert "'data.csv'" in _error(capsys)
    (out / "data.csv").unlink()
    assert main(_merge(out, "--overwrite-output-dir")) == 0
    _no_leftovers(tmp_path)


def _local_inputs(cls_experts, root: Path) -> dict:
    """Experts and dataset as local folders under ``root`` (so that the checks see their paths)."""
    inputs = root / "inputs"
    experts = [shutil.copytree(p, inputs / f"e{k}") for k, p in enumerate(cls_experts["paths"][:2])]
    data = shutil.copytree(cls_experts["data_dir"], inputs / "data")
    return {"experts": experts, "data": data, "root": inputs}


@pytest.mark.parametrize("where", ["expert", "inside-expert", "holds-inputs", "dataset", "hf-cache", "cache-root"])
def test_inputs_are_never_output(cls_experts, tmp_path, capsys, where, no_search):
    local = _local_inputs(cls_experts, tmp_path)
    snapshot = next((HUB_CACHE / "models--org--expert-1" / "snapshots").iterdir())
    out = {"expert": local["experts"][0], "inside-expert": local["experts"][0] / "merged",
           "holds-inputs": local["root"], "dataset": local["data"], "hf-cache": snapshot,
           "cache-root": HUB_CACHE.parent}[where]
    before = sorted(str(p) for p in local["root"].rglob("*")) + sorted(str(p) for p in snapshot.iterdir())
    experts = [str(local["experts"][0]), "org/expert-1"]
    rc = main(["merge", "--experts", *experts, "--dataset", str(local["data"]), "--method", "uniform",
               "--output-dir", str(out), "--overwrite-output-dir"])
    assert rc == 1
    line = _error(capsys)
    assert {"expert": "is expert", "inside-expert": "lies inside expert", "holds-inputs": "contains expert",
            "dataset": "is the dataset", "hf-cache": "Hugging Face cache",
            "cache-root": "contains the Hugging Face cache"}[where] in line
    after = sorted(str(p) for p in local["root"].rglob("*")) + sorted(str(p) for p in snapshot.iterdir())
    assert after == before
    # blend applies the same rule
    assert main(["blend", "--experts", *experts, "--weights", "0.5", "0.5", "--output-dir", str(out),
                 "--overwrite-output-dir"]) == 1
    _error(capsys)


def test_current_directory_with_overwrite_is_refused(cls_experts, tmp_path, capsys, monkeypatch, no_search):
    (tmp_path / "report.docx").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(_merge(Path("."), "--overwrite-output-dir")) == 1
    assert "'.'" in _error(capsys)
    assert (tmp_path / "report.docx").read_text() == "mine"


def test_unwritable_locations_fail_before_the_search(cls_experts, tmp_path, capsys, monkeypatch, no_search):
    (tmp_path / "file").write_text("")
    assert main(_merge(tmp_path / "file" / "out")) == 1
    assert "is a file" in _error(capsys)
    import hf_glue.io.output as output

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(output.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(_merge(locked / "out")) == 1
    assert "cannot be written" in _error(capsys)


def test_full_disk_fails_before_the_search(cls_experts, tmp_path, capsys, monkeypatch, no_search):
    import hf_glue.io.output as output

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    assert main(_merge(tmp_path / "out")) == 1
    assert "free" in _error(capsys) and not (tmp_path / "out").exists()
    assert main(_blend(tmp_path / "out")) == 1
    assert "free" in _error(capsys) and not (tmp_path / "out").exists()


def test_blend_overwrite_follows_the_same_rules(cls_experts, tmp_path, capsys):
    out = tmp_path / "blended"
    assert main(_blend(out)) == 0
    capsys.readouterr()
    assert main(_blend(out)) == 1
    assert "--overwrite-output-dir" in _error(capsys)
    (out / "mine.bin").write_bytes(b"x")
    assert main(_blend(out, "--overwrite-output-dir")) == 1
    assert "'mine.bin'" in _error(capsys)
    (out / "mine.bin").unlink()
    assert main(_blend(out, "--overwrite-output-dir")) == 0
    files = json.loads((out / "merge_result.json").read_text())["files"]
    assert files == sorted(p.name for p in out.iterdir())
    modes = {stat.S_IMODE((out / name).stat().st_mode) for name in files}
    assert len(modes) == 1  # model.safetensors like the rest


def test_compare_output_is_checked_and_overwritable(cls_experts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "compare"
    args = ["compare", *TWO, "--dataset", "org/target", "--methods", "uniform", "--include-experts", "false",
            "--output-dir", str(out)]
    assert main(args) == 0
    assert json.loads((out / "compare.json").read_text())["files"] == ["compare.json", "compare.png"]
    capsys.readouterr()
    _forbid_search(monkeypatch)
    assert main(args) == 1
    assert "--overwrite-output-dir" in _error(capsys)
    (out / "thesis.tex").write_text("mine")
    assert main([*args, "--overwrite-output-dir"]) == 1
    assert "'thesis.tex'" in _error(capsys)
    merged = tmp_path / "merged"  # a merge output is not a compare output
    merged.mkdir()
    (merged / "merge_result.json").write_text("{}")
    assert main([*args[:-1], str(merged), "--overwrite-output-dir"]) == 1
    assert "'merge_result.json'" in _error(capsys)
    monkeypatch.undo()
    (out / "thesis.tex").unlink()
    assert main([*args, "--overwrite-output-dir"]) == 0
    _no_leftovers(tmp_path)


def test_sigterm_during_the_write_removes_the_partial_output(cls_experts, tmp_path, capsys, monkeypatch):
    import hf_glue.engine.streaming as streaming

    blend_checkpoints = streaming.blend_checkpoints

    def then_sigterm(*args, **kwargs):
        written = blend_checkpoints(*args, **kwargs)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would kill the writer silently"
        os.kill(os.getpid(), signal.SIGTERM)
        return written

    monkeypatch.setattr(streaming, "blend_checkpoints", then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(_blend(tmp_path / "out")) == 1
    assert "SIGTERM" in _error(capsys)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_stale_partials_of_dead_writers_are_removed(cls_experts, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}@{host}-abc123"
    running = tmp_path / f".out.partial-{os.getpid()}@{host}-def456"
    elsewhere = tmp_path / f".out.partial-{dead.stdout.strip()}@another-host-ghi789"
    for folder in (stale, running, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert main(_blend(tmp_path / "out")) == 0
    assert not stale.exists() and running.exists() and elsewhere.exists()


@pytest.fixture(scope="module")
def nan_expert(cls_experts, tmp_path_factory) -> Path:
    """A local copy of expert-1 with one NaN weight."""
    path = shutil.copytree(cls_experts["paths"][1], tmp_path_factory.mktemp("nan") / "nan-expert")
    weights = load_file(path / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and t.dim() == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_expert_with_nan_weights_is_refused(cls_experts, nan_expert, tmp_path, capsys, no_search):
    out = tmp_path / "out"
    assert main(["merge", "--experts", "org/expert-0", str(nan_expert), "--dataset", "org/target",
                 "--method", "uniform", "--output-dir", str(out)]) == 1
    line = _error(capsys)
    assert str(nan_expert) in line and "NaN" in line and "weight'" in line
    # at coefficient 0 too (0·NaN is NaN), in the streaming blend
    assert main(["blend", "--experts", "org/expert-0", str(nan_expert), "--weights", "1", "0",
                 "--output-dir", str(out)]) == 1
    line = _error(capsys)
    assert str(nan_expert) in line and "NaN" in line
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_non_finite_weights_are_never_saved(cls_experts, tmp_path):
    from hf_glue import GlueConfig, merge_experts

    result = merge_experts(["org/expert-0", "org/expert-1"], "org/target", GlueConfig(method="uniform"))
    with torch.no_grad():
        next(result.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(GlueError, match="merged model's tensor .* NaN or inf"):
        result.save_pretrained(tmp_path / "out")
    result.eval_after = {"loss": float("nan")}
    with pytest.raises(GlueError, match="--learning-rate"):
        result.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_merge_result_is_strict_json(cls_experts, tmp_path):
    from hf_glue import GlueConfig, merge_experts

    result = merge_experts(["org/expert-0", "org/expert-1"], "org/target", GlueConfig(method="uniform"))
    result.eval = {"loss": float("nan"), "accuracy": float("inf")}
    result.save_pretrained(tmp_path / "out")

    def refuse(token):
        raise ValueError(token)

    data = json.loads((tmp_path / "out" / "merge_result.json").read_text(), parse_constant=refuse)
    assert data["eval"] == {"loss": None, "accuracy": None}


def test_diverging_finetune_ends_in_one_line(cls_experts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_merge(out, "--finetune-epochs", "1", "--learning-rate", "1e30")) == 1
    line = _error(capsys)
    assert "tensor '" in line and "--learning-rate" in line
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_two_runs_finishing_together_never_lose_an_output(tmp_path):
    """Two writers that both found --output-dir free: the one that renames second fails, naming where its own
    complete output went, and the first one's output is untouched (it was moved aside and deleted before)."""
    from hf_glue.errors import GlueError
    from hf_glue.io.output import atomic_dir

    final = tmp_path / "out" / "C"
    with pytest.raises(GlueError, match="written by another run") as err:
        with atomic_dir(final) as mine:
            (mine / "merge_result.json").write_text(json.dumps({"run": "second"}))
            # the other run checked the folder before we wrote, and finished while we ran
            with atomic_dir(final) as other:
                (other / "merge_result.json").write_text(json.dumps({"run": "first"}))
    assert json.loads((final / "merge_result.json").read_text())["run"] == "first"
    kept = final.with_name("C-2")
    assert str(kept) in str(err.value) and json.loads((kept / "merge_result.json").read_text())["run"] == "second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["C", "C-2"]  # no partial left


def test_overwrite_racing_another_run_keeps_both_outputs(tmp_path, monkeypatch):
    """--overwrite-output-dir moved the previous output aside, then another run filled the folder before our rename:
    both complete outputs survive (ours beside), one line says where, no traceback."""
    from hf_glue.errors import GlueError
    from hf_glue.io import output

    final = tmp_path / "C"
    with output.atomic_dir(final) as previous:
        (previous / "merge_result.json").write_text(json.dumps({"run": "previous"}))
    real = output._place

    def racing(tmp: Path, dest: Path) -> None:  # the other run lands between our move-aside and our rename
        dest.mkdir()
        (dest / "merge_result.json").write_text(json.dumps({"run": "other"}))
        real(tmp, dest)

    monkeypatch.setattr(output, "_place", racing)
    with pytest.raises(GlueError, match="written by another run"):
        with output.atomic_dir(final, overwrite=True) as mine:
            (mine / "merge_result.json").write_text(json.dumps({"run": "mine"}))
    assert json.loads((final / "merge_result.json").read_text())["run"] == "other"
    assert json.loads((tmp_path / "C-2" / "merge_result.json").read_text())["run"] == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C", "C-2"]
