"""Session fixtures: tiny experts and target datasets published into a temporary Hugging Face cache.

The environment is set before anything imports huggingface_hub (which reads it at import time), so repo ids
like ``org/expert-0`` resolve through the real client with ``HF_HUB_OFFLINE=1`` and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="hf-glue-tests-"))
TEST_ENV = {
    "HF_HOME": str(_ROOT / "hf-home"),
    "HF_HUB_CACHE": str(_ROOT / "hub"),
    "HF_DATASETS_CACHE": str(_ROOT / "datasets"),
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",  # the loopback Hub stand-in speaks LFS, not Xet
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
os.environ.update(TEST_ENV)

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_glue import testing  # noqa: E402

HUB_CACHE = Path(TEST_ENV["HF_HUB_CACHE"])


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``hf-glue ARGS`` in a fresh process (as a user would), with the test cache and offline mode."""
    full_env = {**os.environ, **TEST_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hf_glue", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=600)


def assert_refused(proc: subprocess.CompletedProcess, needles, out: Path) -> str:
    """A run refused as users are promised: non-zero exit, no traceback, one ``error:`` line naming every needle,
    no output folder and nothing half-written beside it; returns the line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return errors[0]


@pytest.fixture(scope="session")
def build_root() -> Path:
    path = _ROOT / "build"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cls_experts(build_root) -> dict:
    """Three BERT classifiers (org/expert-{0,1,2}) fine-tuned on domains 0-2 from org/base, and the target
    org/target (domain 0)."""
    paths = testing.build_experts(build_root / "cls", task="sequence-classification", n_experts=3)
    ids = []
    for d, path in enumerate(paths):
        testing.publish_to_cache(path, f"org/expert-{d}", HUB_CACHE)
        ids.append(f"org/expert-{d}")
    testing.publish_to_cache(paths[0].parent / "base", "org/base", HUB_CACHE)  # the base they were tuned from
    data = testing.write_dataset(build_root / "target", "sequence-classification", domain=0)
    testing.publish_to_cache(data, "org/target", HUB_CACHE, repo_type="dataset")
    # the same rows under unusual column names, for --text-column / --label-column
    renamed = build_root / "target-renamed"
    renamed.mkdir(exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        (renamed / f"{split}.jsonl").write_text(
            "".join(json.dumps({"utterance": r["text"], "verdict": r["label"]}) + "\n" for r in rows))
    testing.publish_to_cache(renamed, "org/target-renamed", HUB_CACHE, repo_type="dataset")
    return {"ids": ids, "paths": paths, "dataset": "org/target", "data_dir": data}


@pytest.fixture(scope="session")
def bf16_experts(cls_experts, build_root) -> list[str]:
    """The classification experts stored in bfloat16 (org/bf16-expert-{d})."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ids = []
    for d, path in enumerate(cls_experts["paths"]):
        out = build_root / f"bf16-{d}"
        AutoModelForSequenceClassification.from_pretrained(path).to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
        testing.publish_to_cache(out, f"org/bf16-expert-{d}", HUB_CACHE)
        ids.append(f"org/bf16-expert-{d}")
    return ids


@pytest.fixture(scope="session")
def lm_experts(build_root) -> dict:
    """Three tiny GPT-2 experts (org/lm-{d}) on counting domains with strides 1, 3, 5; target org/lm-target."""
    paths = testing.build_experts(build_root / "lm", task="causal-lm", n_experts=3, expert_steps=80)
    ids = []
    for d, path in enumerate(paths):
        testing.publish_to_cache(path, f"org/lm-{d}", HUB_CACHE)
        ids.append(f"org/lm-{d}")
    data = testing.write_dataset(build_root / "lm-target", "causal-lm", domain=0)
    testing.publish_to_cache(data, "org/lm-target", HUB_CACHE, repo_type="dataset")
    return {"ids": ids, "paths": paths, "dataset": "org/lm-target"}


@pytest.fixture(scope="session")
def image_experts(build_root) -> dict:
    """Tiny ViT (org/vit-{d}) and ResNet (org/resnet-{d}) experts on 3 image domains; target org/img-target."""
    out = {}
    for arch in ("vit", "resnet"):
        paths = testing.build_experts(build_root / arch, task=arch, n_experts=3)
        out[arch] = []
        for d, path in enumerate(paths):
            testing.publish_to_cache(path, f"org/{arch}-{d}", HUB_CACHE)
            out[arch].append(f"org/{arch}-{d}")
    data = testing.write_dataset(build_root / "img-target", "image-classification", domain=0)
    testing.publish_to_cache(data, "org/img-target", HUB_CACHE, repo_type="dataset")
    out["dataset"] = "org/img-target"
    return out


@pytest.fixture(scope="session")
def lora_experts(build_root) -> dict:
    """A tiny BERT base (org/lora-base) and three LoRA adapters of it (org/lora-{0,1,2}, domains 0-2, each with
    its own classification head), plus a target mixing domains 0 and 1 (org/lora-mix)."""
    base, paths = testing.build_adapters(build_root / "lora", n_experts=3, base_name="org/lora-base")
    testing.publish_to_cache(base, "org/lora-base", HUB_CACHE)
    ids = []
    for d, path in enumerate(paths):
        testing.publish_to_cache(path, f"org/lora-{d}", HUB_CACHE)
        ids.append(f"org/lora-{d}")
    data = testing.write_dataset(build_root / "lora-mix", "sequence-classification", domain=0, mix=[0, 1])
    testing.publish_to_cache(data, "org/lora-mix", HUB_CACHE, repo_type="dataset")
    return {"ids": ids, "paths": paths, "base": base, "dataset": "org/lora-mix", "data_dir": data}
