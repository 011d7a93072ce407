"""The README runs as written on the bundled example: its Python blocks, its commands' cache variables, its table.

The example cache (``example/expert-{0,1,2}``, ``example/target``) is published once per session with
``scripts/make_example.py``'s own `publish_example`, from the session's classification experts (built by
`hf_glue.testing.build_experts` with the script's defaults), into a temporary folder; each block then runs in a
fresh process with ``HF_HUB_CACHE=<that folder> HF_HUB_OFFLINE=1``, as the README tells a user to.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_ENV

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CACHE_VARIABLES = "HF_HUB_CACHE=example-hub HF_HUB_OFFLINE=1"


def readme_example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def example_hub(cls_experts, tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_example", REPO / "scripts" / "make_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cache = tmp_path_factory.mktemp("readme") / "example-hub"
    script.publish_example(cache, cls_experts["paths"], cls_experts["data_dir"], log=lambda _: None)
    return cache


def example_env(cache: Path) -> dict:
    env_python = Path(sys.executable).parent
    return {**os.environ, **TEST_ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "PATH": f"{env_python}:{os.environ['PATH']}"}


def run_python(code: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=example_env(cache))


@pytest.fixture(scope="module")
def api_run(example_hub, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's `merge_experts` block, run once as written (writes merged-api/)."""
    cwd = tmp_path_factory.mktemp("readme-api")
    return cwd, run_python(readme_example("merge_experts"), example_hub, cwd)


def test_readme_merge_experts_example_runs(api_run):
    cwd, proc = api_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    coefficients = eval(proc.stdout.strip().splitlines()[-1])  # the printed dict
    assert max(coefficients, key=coefficients.get) == "example/expert-0"  # the target's own domain
    assert (cwd / "merged-api" / "model.safetensors").is_file()


def test_readme_callback_example_runs_from_the_blend(example_hub, tmp_path):
    """The README's callback example, with two changes that make its outcome depend on the callback: the Trainer's
    model is loaded from expert-2 (another domain: poor on the target alone) and the learning rate is ~0 (training
    cannot fix it). A low held-out loss then means the callback put θ(α) into the model."""
    code = readme_example("callback")
    start, rate = "from_pretrained(experts[0])  # the experts' architecture", "learning_rate=1e-3"
    assert start in code and rate in code
    code = code.replace(start, "from_pretrained(experts[2])").replace(rate, "learning_rate=1e-12")
    proc = run_python(code, example_hub, tmp_path)
    alone = run_python(re.sub(r"callbacks=\[GlueCallback\(.*\n", "callbacks=[],\n", code), example_hub, tmp_path)
    assert proc.returncode == 0 and alone.returncode == 0, (proc.stderr + alone.stderr)[-3000:]
    with_blend, without = (eval(p.stdout.strip().splitlines()[-1])["eval_loss"] for p in (proc, alone))
    assert with_blend < 0.2 < without, (with_blend, without)


def test_readme_commands_on_the_example_give_its_cache_variables():
    """Every README command that names the example's repos (or reads a result of them) sets the cache variables:
    without them the ids resolve against the Hub and fail."""
    commands = [c for c in readme_commands() if "hf-glue " in c and ("example/" in c or "merged/merge_result" in c)]
    assert any("blend --from-result" in c for c in commands) and any("hf-glue compare" in c for c in commands)
    for command in commands:
        tail = command.split("&&")[-1].strip()
        assert tail.startswith(CACHE_VARIABLES + " hf-glue "), command


def test_readme_blend_command_runs_on_the_example(api_run, example_hub):
    """The README's `blend --from-result` line, as written, in a folder holding example-hub and a merge of it."""
    cwd, proc = api_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(c for c in readme_commands() if "hf-glue blend --from-result merged/merge_result.json" in c)
    (cwd / "example-hub").symlink_to(example_hub)
    (cwd / "merged").mkdir()
    shutil.copy2(cwd / "merged-api" / "merge_result.json", cwd / "merged" / "merge_result.json")
    env = {k: v for k, v in example_env(example_hub).items() if k not in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    blend = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert blend.returncode == 0, blend.stderr[-3000:]
    out = re.search(r"--output-dir (\S+)", line).group(1)
    assert (cwd / out / "model.safetensors").is_file()
    result = (cwd / out / "merge_result.json").read_text()
    assert CACHE_VARIABLES in result  # its own reproduce command carries them too


def test_readme_task_vector_example_runs(example_hub, tmp_path):
    """The README's `--combine ties` line on the example runs as written: the base comes from the experts' cards."""
    line = next(c for c in readme_commands() if "--combine ties" in c and "example/" in c)
    (tmp_path / "example-hub").symlink_to(example_hub)
    env = {k: v for k, v in example_env(example_hub).items() if k not in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    proc = subprocess.run(["bash", "-c", line + " --steps 6"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = (tmp_path / "example-ties" / "merge_result.json").read_text()
    assert '"example/expert-base"' in result and '"ties"' in result


def test_readme_compare_table_has_the_columns_compare_prints():
    """The README's compare output is compare's own format: same header, same note on the memory column."""
    from hf_glue.report.comparison import PEAK_NOTE, format_table

    readme = README.read_text()
    block = re.search(r"```\n(Target accuracy .*?)```", readme, re.S)
    assert block, "README has no pasted compare output"
    lines = block.group(1).splitlines()
    report = {"metric": "accuracy", "greater_is_better": True,
              "dataset": {"id": "example/target", "eval_split": "test"},
              "experts": ["example/expert-0", "example/expert-1", "example/expert-2"],
              "summary": [{"method": "glue", "coefficients": {"a": 1.0}, "merged": {"accuracy": None, "loss": None},
                           "finetuned": {"accuracy": None}, "forward_passes": 0, "backward_passes": 0,
                           "seconds": 0.0, "peak_memory_bytes": 0}]}
    expected = format_table(report).splitlines()
    assert lines[0] == expected[0]
    assert lines[1].split() == expected[1].split()  # same columns, in the same order
    assert PEAK_NOTE in lines and expected[-1] == PEAK_NOTE
    command = next(c for c in readme_commands() if "hf-glue compare" in c and "example/" in c)
    for method in ("glue", "uniform", "data-size", "proxy", "full-gradient", "expert: example/expert-0"):
        assert any(l.startswith(method + " ") for l in lines), method
    assert "--finetune-epochs" in command and "(fine-tuned)" in lines[1]


def test_resumed_trainer_run_continues_from_its_checkpoint(cls_experts, tmp_path):
    """A Trainer run with GlueCallback, stopped after a checkpoint and resumed, ends with the weights of the same run
    uninterrupted (the blend is not copied over the checkpoint's weights again)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from hf_glue import GlueCallback, GlueConfig, merge_experts, testing

    result = merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(steps=4))
    tokenizer = AutoTokenizer.from_pretrained(cls_experts["paths"][0])
    rows = testing.classification_rows(0, 32, 5)
    data = Dataset.from_list([{**tokenizer(r["text"], truncation=True, max_length=16, padding="max_length"),
                               "labels": r["label"]} for r in rows])

    def train(output: Path, max_steps: int, resume: bool = False):
        model = AutoModelForSequenceClassification.from_pretrained(cls_experts["paths"][1])  # not the blend
        args = TrainingArguments(str(output), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
                                 save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
                                 disable_tqdm=True, logging_strategy="no", lr_scheduler_type="constant")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[GlueCallback(result=result)]).train(
            resume_from_checkpoint=resume or None)
        return model.state_dict()

    whole = train(tmp_path / "whole", 4)
    train(tmp_path / "split", 2)
    resumed = train(tmp_path / "split", 4, resume=True)
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor)


def test_callback_starts_from_the_blend(cls_experts):
    """The Trainer's model holds θ(α) when training begins."""
    import torch
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from hf_glue import GlueCallback, GlueConfig, merge_experts

    result = merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(steps=20))
    model = AutoModelForSequenceClassification.from_pretrained(cls_experts["paths"][1])
    callback = GlueCallback(result=result)
    callback.on_train_begin(TrainingArguments("unused", report_to="none"), None, None, model=model)
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
