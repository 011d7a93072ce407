"""The hostile-input campaign (issue 8, item 10): generated command lines, YAML configs and datasets, then one test
per case that a campaign of faults or a new user found.

Every case ends in a correct run (exit 0, a complete output folder) or in exactly one ``error:`` line naming the
culprit — never a traceback, never a partial output. Cases run in-process through ``main`` (no exception but
SystemExit may escape it), except where a real process's stderr is the point. Generated cases are derandomised so
that CI runs the same ones; most fail validation in milliseconds, and those that pass run tiny merges.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HUB_CACHE, run_cli
from hf_glue.commands import main
from hf_glue.config import DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, PushConfig
from hf_glue.testing import classification_vocab


def campaign(examples: int) -> settings:
    """Generated cases: derandomised (the same cases in CI), no example database, no deadline (merges take
    seconds)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


#: The files a complete merge output holds.
COMPLETE = ("config.json", "model.safetensors", "merge_result.json", "README.md")
TWO = ["--experts", "org/expert-0", "org/expert-1"]
#: Cheap settings for cases that pass validation: a few rows, one step, no gain calibration.
TINY = ["--max-train-samples", "8", "--max-eval-samples", "8", "--steps", "1", "--gain", "0.1", "--batch-size", "4",
        "--eval-batch-size", "8", "--calibration-samples", "1", "--proxy-batches", "1", "--finetune-epochs", "0"]


def run_main(capsys, args: Sequence[str]) -> tuple[int, str]:
    """``hf-glue ARGS`` in this process: exit code and stderr; any exception but SystemExit fails the test."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse's own exits (--help)
        code = stop.code
    return code, capsys.readouterr().err


def check_outcome(code: int, err: str, out: Path, culprits: Sequence[str] | None = None) -> str:
    """A correct run, or one error line naming one of ``culprits`` (when given); neither leaves a traceback or a
    partial output. Returns the error line ('' for a correct run)."""
    assert "Traceback" not in err, err
    assert not [p.name for p in out.parent.iterdir() if "partial" in p.name], err
    if code == 0:
        assert all((out / name).is_file() for name in COMPLETE), (sorted(p.name for p in out.iterdir()), err)
        json.loads((out / "merge_result.json").read_text(), parse_constant=_refuse_constant)  # strict JSON
        return ""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert culprits is None or any(c and c in errors[0] for c in culprits), (errors[0], culprits)
    if "is intact; retry with" not in errors[0]:  # only a failed push keeps its (complete) local copy
        assert not out.exists(), errors[0]
    return errors[0]


def _refuse_constant(name: str):
    raise AssertionError(f"merge_result.json holds {name}: not strict JSON")


def error_line(capsys, args: Sequence[str], out: Path) -> str:
    """Run a case that must fail: its one error line (checked as `check_outcome` does)."""
    code, err = run_main(capsys, args)
    assert code != 0, err
    return check_outcome(code, err, out)


def culprits_of(pairs: Sequence[tuple[str, object]]) -> list[str]:
    """What an error may name to point at one of ``pairs``: the option, or its value as given or quoted (values
    too short to identify anything are left out)."""
    names = []
    for key, value in pairs:
        names += ["--" + key.lstrip("-").replace("_", "-"), key]
        for v in value if isinstance(value, list) else [value]:
            names += [text for text in {repr(v), str(v)} if len(text) >= 3]
    return names


def fresh_dir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


# --- generated command lines --------------------------------------------------------------------------------

#: Per option: hostile values (wrong type, out of range, non-finite, absurd) among a few cheap valid ones.
CLI_VALUES: dict[str, list] = {
    "--steps": ["0", "-3", "1", "2", "1.5", "abc", "99999999999999999999", "1000001", ""],
    "--batch-size": ["0", "-1", "1", "4", "3.7", "nan", "x"],
    "--eval-batch-size": ["0", "1", "5", "-2", "1e3"],
    "--seed": ["-1", "0", "7", "4294967296", "1.5", "seed"],
    "--gain": ["nan", "inf", "-inf", "0", "-1", "0.1", "1e400", "x"],
    "--perturbation": ["nan", "0", "-0.1", "0.05", "inf"],
    "--first-step": ["nan", "0", "0.1", "-1"],
    "--stability": ["-11", "-0.5", "0", "3", "nan"],
    "--perturbation-decay": ["-1", "0.101", "nan", "inf"],
    "--spsa-samples": ["0", "-1", "1", "2", "abc"],
    "--calibration-samples": ["0", "1", "-4"],
    "--max-length": ["0", "-1", "8", "128", "100000", "x"],
    "--max-train-samples": ["0", "-5", "1", "8"],
    "--max-eval-samples": ["0", "1", "8", "-1"],
    "--learning-rate": ["nan", "0", "-1e-3", "1e-3", "inf"],
    "--finetune-epochs": ["-1", "nan", "0", "inf"],
    "--weights": [["nan", ".5", ".5"], [".5", ".5"], ["-1", "2"], ["inf", "0"], [".2", ".8"], ["x"]],
    "--data-sizes": [["0", "1"], ["1", "2"], ["5"], ["-3", "4"], ["1.5", "2"]],
    "--method": ["uniform", "weights", "glue", "magic", "data-size", "", "UNIFORM", "full-gradient"],
    "--parametrization": ["simplex", "softmax", "cube"],
    "--granularity": ["model", "block", "tensor", "layer"],
    "--init": ["uniform", "data-size", "random"],
    "--dtype": ["auto", "float32", "float8", "bfloat16"],
    "--max-memory": ["1KB", "20GiB", "lots", "-1GB", "1.2.3GB", "0"],
    "--proxy": ["loss", "logme", "vibes"],
    "--parallel": ["data", "perturbation", "both"],
    "--checkpoint-every": ["-1", "0", "5", "x"],
    "--experts": [["org/expert-0"], ["org/expert-0", "org/expert-0"], ["org/expert-0", "org/nope"],
                  ["", "org/expert-1"], ["org/expert-0", "org/expert-1@nope"], ["org/expert-1", "org/expert-2"]],
    "--dataset": ["org/no-such-data", "", "org/target@nope", "/nonexistent/file.csv", "org/target-renamed"],
    "--text-column": ["nope", "label", "text"],
    "--label-column": ["nope", "text", "label"],
    "--eval-split": ["nope", "train", "test"],
    "--train-split": ["nope", "test"],
    "--task": ["causal-lm", "image-classification", "nope", "sequence-classification"],
    "--resume": ["true", "maybe"],
    "--push-to-hub": ["not a repo", "org/x"],
    "--overwrite-output-dir": ["true", "nah"],
    "--stepz": ["5"],  # mistyped flags
    "--batch_sise": ["4"],
    "--lerning-rate": ["1"],
}


def _pairs(flags: list[str]):
    return st.tuples(*[st.sampled_from(CLI_VALUES[f]).map(lambda v, f=f: (f, v)) for f in flags])


CLI_CASES = st.lists(st.sampled_from(sorted(CLI_VALUES)), min_size=1, max_size=3, unique=True).flatmap(_pairs)


def test_generated_command_lines(cls_experts, capsys, tmp_path):
    """Hostile values for 1-3 options on top of a valid tiny merge."""
    seen = []

    @campaign(110)
    @given(pairs=CLI_CASES)
    def case(pairs):
        seen.append(pairs)
        out = fresh_dir(tmp_path) / "out"
        args = ["merge", *TWO, "--dataset", "org/target", "--output-dir", str(out), "--method", "uniform", *TINY]
        for flag, value in pairs:
            args += [flag, *(value if isinstance(value, list) else [value])]
        code, err = run_main(capsys, args)
        check_outcome(code, err, out, culprits_of(pairs))

    case()
    assert len(seen) >= 110


# --- generated YAML configs ---------------------------------------------------------------------------------

CONFIG_FIELDS = sorted({f.name for c in (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, OutputConfig,
                                         PushConfig) for f in fields(c)})
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**70, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["uniform", "glue", "softmax", "tensor", "1e-3", "nan", "org/expert-0", "20GiB", "test"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))
KEYS = st.one_of(st.sampled_from(CONFIG_FIELDS), st.sampled_from(CONFIG_FIELDS), st.sampled_from(CONFIG_FIELDS),
                 st.sampled_from(["stepz", "batch-size", "max-length", "config"]), st.text(min_size=1, max_size=5))
YAML_FILES = st.one_of(
    st.dictionaries(KEYS, VALUES, min_size=1, max_size=3).map(lambda d: ("mapping", d)),
    st.binary(max_size=32).map(lambda b: ("bytes", b)),
    st.text(max_size=32).map(lambda t: ("text", t)),
    st.sampled_from(["steps: [1\n", "{", "- a\n- b\n", "a: *b\n", "!!python/object/apply:os.system [ls]\n",
                     "steps: 1\nsteps: 2\n", "\t- x"]).map(lambda t: ("text", t)),
)


def test_generated_yaml_configs(cls_experts, capsys, tmp_path):
    """Mappings of options to hostile values, malformed YAML, binary and random text as ``--config``."""
    seen = []

    @campaign(70)
    @given(spec=YAML_FILES)
    def case(spec):
        kind, content = spec
        seen.append(spec)
        folder = fresh_dir(tmp_path)
        path, out = folder / "run.yaml", folder / "out"
        if kind == "bytes":
            path.write_bytes(content)
        else:
            path.write_text(yaml.safe_dump(content) if kind == "mapping" else content)
        args = ["merge", "--config", str(path), *TWO, "--dataset", "org/target", "--output-dir", str(out),
                "--method", "uniform", *TINY]
        code, err = run_main(capsys, args)
        culprits = [str(path)] + (culprits_of(list(content.items())) if kind == "mapping" else [])
        check_outcome(code, err, out, culprits)

    case()
    assert len(seen) >= 70


# --- generated datasets -------------------------------------------------------------------------------------

WORDS = classification_vocab(3)
GOOD_TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=10).map(" ".join)
BAD_TEXT = st.sampled_from(["", "   ", None, math.nan, 3, 1.5, True, ["c1"], {"a": 1}, "é\u202e\u0000 c1",
                            " ".join(["c1"] * 300)])
GOOD_LABEL = st.sampled_from([0, 1])
BAD_LABEL = st.sampled_from([2, -1, "x", None, 1.0, 1.5, True, "LABEL_1", "1", [0], math.nan])
COLUMNS = st.sampled_from([("text", "label"), ("text", "label"), ("sentence", "target"), ("txt", "label"),
                           ("text", None)])


@st.composite
def datasets_(draw) -> tuple[str, list[str], list[dict]]:
    """A file format, its columns and rows: half of them clean, the others with hostile cells, renamed or missing
    columns, rows missing a field, or too few rows."""
    if draw(st.booleans()):
        rows = [{"text": draw(GOOD_TEXT), "label": draw(GOOD_LABEL)} for _ in range(draw(st.integers(2, 6)))]
        return draw(st.sampled_from(["csv", "jsonl"])), ["text", "label"], rows
    text_col, label_col = draw(COLUMNS)
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row = {text_col: draw(st.one_of(GOOD_TEXT, BAD_TEXT))}
        if label_col:
            row[label_col] = draw(st.one_of(GOOD_LABEL, BAD_LABEL))
        if draw(st.integers(0, 5)) == 0:  # mixed schema: a row without one of its fields
            row.pop(draw(st.sampled_from(sorted(row))))
        rows.append(row)
    return draw(st.sampled_from(["csv", "jsonl"])), [c for c in (text_col, label_col) if c], rows


def write_rows(path: Path, fmt: str, columns: list[str], rows: list[dict]) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])


def test_generated_datasets(cls_experts, capsys, tmp_path):
    """Target data files with empty, null, NaN, mistyped and missing cells, renamed columns and 0-6 rows."""
    seen = []

    @campaign(40)
    @given(spec=datasets_())
    def case(spec):
        fmt, columns, rows = spec
        seen.append(spec)
        folder = fresh_dir(tmp_path)
        path, out = folder / f"target.{fmt}", folder / "out"
        write_rows(path, fmt, columns, rows)
        code, err = run_main(capsys, ["merge", *TWO, "--dataset", str(path), "--output-dir", str(out),
                                      "--method", "uniform", "--eval-batch-size", "4"])
        check_outcome(code, err, out, [str(path), *(repr(c) for c in columns), "--text-column", "--label-column"])

    case()
    assert len(seen) >= 40


# --- the cases found by hand: options ------------------------------------------------------------------------

#: option values → what the one error line must name
OPTION_CASES = {
    "gain_nan": (["--gain", "nan"], ["--gain", "nan"]),
    "gain_inf": (["--gain", "inf"], ["--gain", "inf"]),
    "perturbation_nan": (["--perturbation", "nan"], ["--perturbation", "nan"]),
    "first_step_nan": (["--first-step", "nan"], ["--first-step", "nan"]),
    "weights_nan": (["--method", "weights", "--weights", "nan", ".5", ".5"], ["--weights", "nan"]),
    "learning_rate_nan": (["--learning-rate", "nan"], ["--learning-rate", "nan"]),
    "stability_negative": (["--stability", "-11"], ["--stability", "-11"]),
    "max_length_0": (["--max-length", "0"], ["--max-length", "at least 1"]),
    "eval_batch_size_0": (["--eval-batch-size", "0"], ["--eval-batch-size", "at least 1"]),
    "max_train_samples_0": (["--max-train-samples", "0"], ["--max-train-samples", "at least 1"]),
    "max_eval_samples_0": (["--max-eval-samples", "0"], ["--max-eval-samples", "at least 1"]),
    "steps_huge": (["--steps", "99999999999999999999"], ["--steps", "99999999999999999999", "1000000"]),
    "spsa_samples_0": (["--spsa-samples", "0"], ["--spsa-samples", "at least 1"]),
    "seed_too_big": (["--seed", "4294967296"], ["--seed", "4294967296"]),
    "max_memory_unreadable": (["--max-memory", "1.2.3GB"], ["--max-memory", "1.2.3GB"]),
    "mistyped_flag": (["--stepz", "5"], ["unknown option --stepz; did you mean --steps?"]),
    "mistyped_underscore_flag": (["--eval_batch_sise", "5"], ["did you mean --eval-batch-size?"]),
    "stray_argument": (["oops"], ["'oops'"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_is_one_line(case, capsys, tmp_path):
    extra, needles = OPTION_CASES[case]
    out = tmp_path / "out"
    line = error_line(capsys, ["merge", *TWO, "--dataset", "org/target", "--output-dir", str(out), *extra], out)
    for needle in needles:
        assert needle in line, line
    assert "HfArgumentParser" not in line and len(line) < 300, line


def test_unknown_command_suggests_one(capsys):
    assert main(["mrege"]) == 2
    assert "unknown command 'mrege'; did you mean merge?" in capsys.readouterr().err


#: YAML text → what the one error line must name (``{path}``: the file)
YAML_CASES = {
    "steps_list": ("steps: [1, 2]\n", ["--steps", "[1, 2]"]),
    "batch_size_float": ("batch_size: 3.7\n", ["--batch-size", "3.7", "whole number"]),
    "experts_string": ("experts: e0\n", ["--experts", "'e0'", "list"]),
    "malformed": ("steps: [1, 2\n", ["{path}", "not valid YAML", "line"]),
    "binary": (b"\x00\xff\xfe\x01 steps", ["{path}", "UTF-8"]),
    "not_a_mapping": ("- steps\n- 3\n", ["{path}", "mapping"]),
    "unknown_key": ("stepz: 3\n", ["{path}", "stepz"]),
    "nan_gain": ("gain: .nan\n", ["--gain", "nan"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_yaml_config_is_one_line(case, capsys, tmp_path):
    content, needles = YAML_CASES[case]
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    line = error_line(capsys, ["merge", "--config", str(path), "--dataset", "org/target", "--output-dir", str(out)],
                      out)
    for needle in needles:
        assert needle.format(path=path) in line, line


@pytest.mark.parametrize("content", ["learning_rate: [1\n", b"\x89PNG\x00\xff", "- 1\n", "learning_rate: .nan\n",
                                     "learnin_rate: 1\n"])
def test_bad_training_args_file_is_one_line(content, capsys, tmp_path):
    path, out = tmp_path / "args.yaml", tmp_path / "out"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    line = error_line(capsys, ["merge", *TWO, "--dataset", "org/target", "--output-dir", str(out),
                               "--finetune-epochs", "1", "--training-args", str(path)], out)
    assert "--training-args" in line and str(path) in line, line


def test_config_values_are_type_checked_in_the_api():
    """The same validation guards the Python API, which bypasses argparse."""
    from hf_glue.errors import GlueError

    for make, needle in ((lambda: GlueConfig(batch_size=3.7), "--batch-size"),
                         (lambda: GlueConfig(steps=[1, 2]), "--steps"),
                         (lambda: ExpertsConfig(experts="e0"), "--experts"),
                         (lambda: DataConfig(max_train_samples=0), "--max-train-samples"),
                         (lambda: GlueConfig(weights=[math.inf, 0.0]), "--weights")):
        with pytest.raises(GlueError, match=needle):
            make()
    assert GlueConfig(gain=1, weights=(1, 0)).gain == 1.0 and GlueConfig(weights=(1, 0)).weights == [1.0, 0.0]


# --- the cases found by hand: data ---------------------------------------------------------------------------

LONG = " ".join(["c1", "d0w1"] * 100)
#: file name and content → what the one error line must name
DATA_CASES = {
    "empty_csv": ("t.csv", "", ["t.csv", "empty"]),
    "header_only_csv": ("t.csv", "text,label\n", ["t.csv", "header", "no rows"]),
    "nan_text_csv": ("t.csv", "text,label\nc1 c2,1\n,0\nc3,1\n", ["row 2", "'text'"]),
    "nan_literal_csv": ("t.csv", "text,label\nc1 c2,1\nNaN,0\nc3,1\n", ["row 2", "'text'"]),
    "null_text_jsonl": ("t.jsonl", '{"text": "c1", "label": 1}\n{"text": null, "label": 0}\n', ["row 2", "'text'"]),
    "blank_text_jsonl": ("t.jsonl", '{"text": "c1", "label": 1}\n{"text": "  ", "label": 0}\n', ["row 2", "blank"]),
    "one_row": ("t.csv", "text,label\nc1 c2,1\n", ["t.csv", "1 row", "--eval-split"]),
    "mixed_schema_jsonl": ("t.jsonl", '{"text": "c1", "label": 1}\n{"text": "c2", "label": 0}\n'
                           '{"sentence": "c3", "label": 0}\n', ["row 3", "'text'"]),
    "mixed_label_types": ("t.jsonl", '{"text": "c1", "label": 1}\n{"text": "c2", "label": "x"}\n',
                          ["'label'", "mixes types", "row 2"]),
    "numbers_as_text": ("t.csv", "text,label\n1,1\n2,0\n3,1\n", ["'text'", "--text-column"]),
    "binary_jsonl": ("t.jsonl", b"\x00\xff\xfe\x01garbage", ["t.jsonl", "could not be loaded"]),
    "null_label": ("t.jsonl", '{"text": "c1", "label": 1}\n{"text": "c2", "label": null}\n', ["row 2", "'label'"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line(case, cls_experts, capsys, tmp_path):
    name, content, needles = DATA_CASES[case]
    path, out = tmp_path / name, tmp_path / "out"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    line = error_line(capsys, ["merge", *TWO, "--dataset", str(path), "--output-dir", str(out), "--method", "uniform"],
                      out)
    for needle in needles:
        assert needle in line, line


def test_empty_held_out_split_is_one_line(cls_experts, capsys, tmp_path):
    """A split smaller than needed: the dataset folder's test split has no rows."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "c1 c2", "label": 1}\n{"text": "c3", "label": 0}\n')
    (tmp_path / "data" / "test.jsonl").write_text("")
    line = error_line(capsys, ["merge", *TWO, "--dataset", str(tmp_path / "data"), "--output-dir",
                               str(tmp_path / "out"), "--method", "uniform"], tmp_path / "out")
    assert "'test'" in line and "no rows" in line, line


def test_text_longer_than_the_positions_is_cut_with_a_note(cls_experts, capsys, caplog, tmp_path):
    """The tiny experts hold 64 positions: the default (128) is quietly cut to them, a larger --max-length is cut
    with a note; never an index error."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": LONG, "label": i % 2}) + "\n" for i in range(20)))
    for extra, noted in (([], False), (["--max-length", "100"], True)):
        out = tmp_path / f"out{len(extra)}"
        caplog.clear()
        code, err = run_main(capsys, ["merge", *TWO, "--dataset", str(path), "--output-dir", str(out), "--method",
                                      "uniform", *extra])
        check_outcome(code, err, out)
        assert code == 0 and ("64 positions" in caplog.text) == noted, err
        assert json.loads((out / "merge_result.json").read_text())["config"]["data"]["max_length"] == 64


# --- the cases found by hand: experts ------------------------------------------------------------------------

def test_unsupported_architecture_is_named_before_loading(cls_experts, capsys, tmp_path):
    specs = []
    for name in ("whisper-a", "whisper-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}))
        specs.append(str(tmp_path / name))
    line = error_line(capsys, ["merge", "--experts", *specs, "--dataset", "org/target", "--output-dir",
                               str(tmp_path / "out")], tmp_path / "out")
    assert "WhisperForConditionalGeneration" in line and "no hf-glue task supports" in line, line
    assert "seq2seq (AutoModelForSeq2SeqLM)" in line and len(line) < 600, line


@pytest.mark.parametrize("kind", ["dot", "symlink", "sha"])
def test_aliases_of_one_expert_are_refused(kind, cls_experts, capsys, tmp_path, monkeypatch):
    shutil.copytree(cls_experts["paths"][0], tmp_path / "e0")
    monkeypatch.chdir(tmp_path)
    if kind == "dot":
        experts = ["e0", "./e0"]
    elif kind == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "e0")
        experts = ["e0", "link"]
    else:
        sha = (HUB_CACHE / "models--org--expert-0" / "refs" / "main").read_text().strip()
        experts = ["org/expert-0", f"org/expert-0@{sha}"]
    line = error_line(capsys, ["merge", "--experts", *experts, "--dataset", "org/target", "--output-dir",
                               str(tmp_path / "out"), "--method", "uniform"], tmp_path / "out")
    assert "same checkpoint" in line and f"{experts[0]!r}" in line and f"{experts[1]!r}" in line, line


def test_remote_code_pointer_is_not_copied_without_its_code(cls_experts, capsys, caplog, tmp_path):
    specs = []
    for d in (0, 1):
        folder = tmp_path / f"e{d}"
        shutil.copytree(cls_experts["paths"][d], folder)
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomBert"}
        (folder / "config.json").write_text(json.dumps(config))
        specs.append(str(folder))
    out = tmp_path / "out"
    code, err = run_main(capsys, ["merge", "--experts", *specs, "--dataset", "org/target", "--output-dir", str(out),
                                  "--method", "uniform"])
    check_outcome(code, err, out)
    assert code == 0 and "dropped auto_map from config.json" in caplog.text, err
    assert "auto_map" not in json.loads((out / "config.json").read_text())


# --- the cases found by hand: the Hub ------------------------------------------------------------------------

@contextmanager
def silent_endpoint() -> Iterator[str]:
    """A loopback endpoint that accepts connections (the kernel completes them) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def closed_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def online(monkeypatch):
    """Lift the suite's offline mode in this process, with a 1 s Hub timeout; returns a setter for the endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    return lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)


@pytest.mark.parametrize("endpoint", ["silent", "closed"])
def test_unreachable_hub_falls_back_to_the_cache_once(endpoint, online, cls_experts, capsys, tmp_path):
    """A cached run works through a Hub that never answers (or refuses): one note, one bounded wait."""
    with silent_endpoint() as silent:
        url = silent if endpoint == "silent" else closed_endpoint()
        online(url)
        out = tmp_path / "out"
        start = time.monotonic()
        code, err = run_main(capsys, ["merge", *TWO, "--dataset", "org/target", "--output-dir", str(out),
                                      "--method", "uniform"])
        elapsed = time.monotonic() - start
    check_outcome(code, err, out)
    assert code == 0, err
    assert f"Resolving org/expert-0 on {url}" in err
    notes = [line for line in err.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1 and "local cache" in notes[0], err
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("endpoint", ["silent", "closed"])
def test_unreachable_hub_and_no_cache_is_one_line(endpoint, online, capsys, tmp_path):
    with silent_endpoint() as silent:
        url = silent if endpoint == "silent" else closed_endpoint()
        online(url)
        start = time.monotonic()
        line = error_line(capsys, ["merge", "--experts", "org/not-cached-0", "org/not-cached-1", "--dataset",
                                   "org/target", "--output-dir", str(tmp_path / "out")], tmp_path / "out")
        elapsed = time.monotonic() - start
    assert "org/not-cached-0" in line and url in line and "cannot be reached" in line, line
    assert elapsed < (15 if endpoint == "silent" else 5), elapsed


def test_silent_hub_real_process_is_bounded_and_one_line(tmp_path):
    """The 500 s silent hang, as a user meets it: a real process, bounded by the timeout, one line, no traceback."""
    with silent_endpoint() as url:
        start = time.monotonic()
        proc = run_cli("merge", "--experts", "org/not-cached-0", "org/not-cached-1", "--dataset", "org/target",
                       "--output-dir", str(tmp_path / "out"),
                       env={"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2"})
        elapsed = time.monotonic() - start
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and url in errors[0], proc.stderr
    assert f"Resolving org/not-cached-0 on {url}" in proc.stderr
    assert elapsed < 90 and not (tmp_path / "out").exists()


def test_bad_revision_lists_what_the_cache_holds(cls_experts, capsys, tmp_path):
    sha = (HUB_CACHE / "models--org--expert-1" / "refs" / "main").read_text().strip()
    line = error_line(capsys, ["merge", "--experts", "org/expert-0", "org/expert-1@no-such-branch", "--dataset",
                               "org/target", "--output-dir", str(tmp_path / "out")], tmp_path / "out")
    assert "revision 'no-such-branch'" in line and f"main → {sha[:10]}" in line, line
    assert os.environ["HF_HUB_OFFLINE"] == "1" and "HF_HUB_OFFLINE" in line


def test_hub_messages_never_show_endpoint_credentials(online, capsys, tmp_path):
    online(closed_endpoint().replace("http://", "http://user:s3cret@"))
    code, err = run_main(capsys, ["merge", "--experts", "org/not-cached-0", "org/not-cached-1", "--dataset",
                                  "org/target", "--output-dir", str(tmp_path / "out")])
    check_outcome(code, err, tmp_path / "out", ["cannot be reached"])
    assert code != 0 and "s3cret" not in err and "http://127.0.0.1:" in err, err
