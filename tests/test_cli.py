"""The command line as a user meets it: help, YAML configs, the README's own example command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_glue.commands import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_commands_and_explains_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "merge" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in ("--experts", "--dataset", "--steps", "--parametrization", "--granularity", "--text-column",
                 "--allow-pickle", "--trust-remote-code", "--output-dir", "--config"):
        assert flag in text, flag
    assert "SPSA" in text and "simplex" in text


def test_help_reads_like_transformers(capsys):
    """Flags show as flags (``--cpu``, not ``--cpu [CPU]``) and the options a command needs without brackets."""
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    usage = " ".join(capsys.readouterr().out.split("\n\n", 1)[0].split())  # argparse wraps at the terminal width
    assert "[--cpu]" in usage and "[--resume]" in usage and "[--allow-pickle]" in usage and "[CPU]" not in usage
    for needed in ("--experts EXPERTS", "--dataset DATASET", "--output-dir OUTPUT_DIR"):
        assert needed in usage and f"[{needed}" not in usage, needed
    assert "--method {glue,uniform,data-size,proxy,full-gradient,cma,nevergrad,weights}" in usage
    from hf_glue.config import BUILTIN_METHODS
    from hf_glue.methods import available_methods

    assert sorted(BUILTIN_METHODS) == sorted(available_methods())  # the list --help shows is the registry's
    assert main(["merge", "--experts", "org/expert-0", "org/expert-1", "--dataset", "org/target", "--cpu", "false",
                 "--output-dir", "/nonexistent/x", "--steps", "0"]) == 1  # a flag still takes a value
    assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["merge", "--help"], ["compare", "--help"], ["merge", "--steps", "-5"],
                                  ["estimate", "--experts", "a", "b", "--nonsense"]])
def test_help_and_argument_errors_come_before_torch_and_transformers(argv):
    """Help and a bad argument are answered without importing torch or transformers (seconds of start-up)."""
    import subprocess
    import sys

    code = ("import sys\nfrom hf_glue.commands import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_yaml_config_sets_defaults_and_flags_win(cls_experts, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "experts: [org/expert-0, org/expert-1]\ndataset: org/target\nsteps: 7\nseed: 3\nmethod: glue\n"
    )
    out = tmp_path / "out"
    assert main(["merge", "--config", str(config), "--steps", "4", "--output-dir", str(out)]) == 0
    result = json.loads((out / "merge_result.json").read_text())
    assert result["config"]["glue"]["steps"] == 4 and result["config"]["glue"]["seed"] == 3
    assert len(result["history"]) == 4


def test_yaml_unknown_key_is_an_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("experts: [a, b]\nstepz: 3\n")
    assert main(["merge", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 1
    assert "stepz" in capsys.readouterr().err


def test_readme_example_command_runs(tmp_path):
    """The first README command, minus the install steps, run as written in a scratch folder."""
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "scripts/make_example.py" in l and "hf-glue merge" in l)
    steps = [s.strip() for s in line.split("&&")]
    assert steps[0].startswith("python -m pip install torch==2.13.0")
    runnable = " && ".join(s for s in steps if "pip install" not in s)
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    import subprocess
    import sys

    env_python = Path(sys.executable).parent
    proc = subprocess.run(["bash", "-c", runnable], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PATH": f"{env_python}:{__import__('os').environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    coefficients = dict(re.findall(r"(example/expert-\d)\s+([0-9.]+)", proc.stdout))
    assert max(coefficients, key=lambda k: float(coefficients[k])) == "example/expert-0", proc.stdout
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_help_shows_each_option_once_with_one_default(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    assert not re.search(r"--[a-z]+_[a-z_]+", text), "underscore spellings parse but are not shown"
    for useless in ("(default: None)", "(default: False)", "(default: [])"):
        assert useless not in text
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    for block in options:
        assert block.lower().count("default") <= 1, block
    help_of = {block.split()[0]: " ".join(block.split()) for block in options}
    assert "weights" in help_of["--method"]
    assert "--gain" in help_of["--calibration-samples"] and "--learning-rate" not in help_of["--calibration-samples"]
    assert "(default: 100)" in help_of["--steps"]


def test_underscore_spellings_still_parse():
    from hf_glue.commands import build_parser, merge
    from hf_glue.commands.parsing import build_configs

    _, parsers = build_parser()
    configs = build_configs(parsers["merge"], merge.CONFIGS, ["--eval_batch_size", "8", "--data-sizes", "1", "2"])
    glue = next(c for c in configs if type(c).__name__ == "GlueConfig")
    assert glue.eval_batch_size == 8 and glue.data_sizes == [1, 2]


def test_redirected_output_logs_lines_not_bars(cls_experts, tmp_path):
    """With stderr in a file, progress comes as a few plain lines (search and fine-tuning), no carriage-return
    redraws (from our loops, transformers' weight loading, datasets' tokenizing or the Trainer)."""
    import os
    import subprocess
    import sys

    from conftest import TEST_ENV

    # nothing inherited that would turn the libraries' bars off already (an in-process run of `main` sets them)
    env = {k: v for k, v in {**os.environ, **TEST_ENV}.items()
           if k not in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
                        "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-m", "hf_glue", "merge", "--experts", "org/expert-0", "org/expert-1",
                           "--dataset", "org/target", "--steps", "30", "--finetune-epochs", "1",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr, proc.stderr[-2000:]
    assert "CPU threads per process: 1 (experts of " in proc.stderr  # tiny experts: one thread, said once
    lines = [line for line in proc.stderr.splitlines() if line.startswith("GLUE (SPSA): ")]
    assert 3 <= len(lines) <= 12 and lines[-1].startswith("GLUE (SPSA): 30/30 (loss="), lines


def test_threads_per_process_are_chosen_and_can_be_overridden(monkeypatch):
    """Tiny experts: one thread; larger ones: the cores divided among this machine's processes; --threads and
    OMP_NUM_THREADS win."""
    from hf_glue.engine import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.choose_threads(None, 100_000, 1)[0] == 1
    assert threads.choose_threads(None, 50_000_000, 1)[0] == 16
    assert threads.choose_threads(None, 50_000_000, 4)[0] == 4
    assert threads.choose_threads(None, 50_000_000, 32)[0] == 1
    assert threads.choose_threads(3, 100_000, 1) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose_threads(None, 100_000, 1)[0] is None  # the user's setting is kept
