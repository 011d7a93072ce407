"""The README's Python examples run as written (offline, against the test cache)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_ENV

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


@pytest.mark.parametrize("name", ["merge_experts", "callback"])
def test_readme_example_runs(name, readme_repos, tmp_path):
    import os

    proc = subprocess.run([sys.executable, "-c", readme_example(name)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **TEST_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if name == "merge_experts":
        coefficients = eval(proc.stdout.strip().splitlines()[-1])  # the printed dict
        assert coefficients["org/a"] > coefficients["org/b"]
        assert (tmp_path / "merged-api" / "model.safetensors").is_file()
    else:
        metrics = eval(proc.stdout.strip().splitlines()[-1])
        assert metrics["eval_loss"] < 0.2  # trained from the GLUE blend (org/a alone is the target's expert)


def test_callback_starts_from_the_blend(cls_experts, readme_repos):
    """The Trainer's model holds θ(α) when training begins."""
    import torch
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from hf_glue import GlueCallback, GlueConfig, merge_experts

    result = merge_experts(["org/a", "org/b"], "org/target", GlueConfig(steps=20))
    model = AutoModelForSequenceClassification.from_pretrained(cls_experts["paths"][1])
    callback = GlueCallback(result=result)
    callback.on_train_begin(TrainingArguments("unused", report_to="none"), None, None, model=model)
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
