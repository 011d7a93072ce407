"""Build the bundled example: three tiny experts fine-tuned from one base on different domains, plus a target
dataset from the first expert's domain, published into a local Hugging Face cache so that repo ids resolve
offline.

    python scripts/make_example.py --cache-dir example-hub
    HF_HUB_CACHE=example-hub HF_HUB_OFFLINE=1 hf-glue merge \
        --experts example/expert-0 example/expert-1 example/expert-2 --dataset example/target --output-dir merged

Every command that reads the example (merge, compare, blend --from-result, the Python examples) needs those
two variables: the repo ids exist only in that cache. The experts' base is published too, as
``example/expert-base``, and each expert's model card names it, so task-vector merges (``--combine ties``) run on
the example without ``--base-model``.

With ``--adapters`` it publishes the LoRA example (into the same cache, beside anything already there): a tiny base
``example/base``, three PEFT LoRA adapters of it ``example/lora-{0,1,2}`` (each trained on one domain, with its own
classification head) and the same target dataset ``example/target``:

    python scripts/make_example.py --cache-dir example-hub --adapters
    HF_HUB_CACHE=example-hub HF_HUB_OFFLINE=1 hf-glue merge \
        --experts example/lora-0 example/lora-1 example/lora-2 --dataset example/target --output-dir merged-lora
    HF_HUB_CACHE=example-hub HF_HUB_OFFLINE=1 hf-glue merge \
        --experts example/lora-0 example/lora-1 example/lora-2 --dataset example/target --output-dir lora-blend \
        --save-as adapter
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from hf_glue.testing import build_adapters, build_experts, publish_to_cache, write_dataset

#: the repo id of the base the example's full experts were fine-tuned from (the LoRA example's base is example/base)
BASE_ID = "example/expert-base"


def make_example(cache_dir: str | Path, task: str = "sequence-classification", experts: int = 3,
                 target_domain: int = 0, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Publish ``example/expert-{d}`` and the dataset ``example/target`` into ``cache_dir``; returns it."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_experts(Path(tmp), task=task, n_experts=experts, seed=seed)
        data = write_dataset(Path(tmp) / "target", task, target_domain, seed=seed)
        return publish_example(cache_dir, paths, data, target_domain, log)


def publish_example(cache_dir: str | Path, expert_paths: list[Path], dataset: Path, target_domain: int = 0,
                    log: Callable[[str], None] = print) -> Path:
    """Publish built experts as ``example/expert-{d}``, the base they were fine-tuned from (``base/`` beside them)
    as ``example/expert-base`` and ``dataset`` as ``example/target`` into ``cache_dir``. Each expert gets a model
    card naming that base (``base_model``), as a Hub fine-tune's card does, so ``--combine`` finds it."""
    base = Path(expert_paths[0]).parent / "base"
    models = [(BASE_ID, base, "the base the experts were fine-tuned from")] if (base / "config.json").is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for d, path in enumerate(expert_paths):
            folder = shutil.copytree(path, Path(tmp) / f"expert-{d}")
            if models:
                (folder / "README.md").write_text(
                    f"---\nbase_model: {BASE_ID}\n---\n\n# example/expert-{d}\n\nA tiny expert of hf-glue's bundled "
                    f"example, fine-tuned from {BASE_ID} on domain {d}.\n")
            models.append((f"example/expert-{d}", folder, f"fine-tuned on domain {d}"))
        return _publish(cache_dir, models, dataset, target_domain, log)


def _publish(cache_dir: str | Path, models: list[tuple[str, Path, str]], dataset: Path, target_domain: int,
             log: Callable[[str], None]) -> Path:
    """Publish ``(repo id, folder, what it is)`` models and ``dataset`` as ``example/target`` into ``cache_dir``."""
    cache = Path(cache_dir)
    for repo_id, path, what in models:
        sha = publish_to_cache(path, repo_id, cache)
        log(f"{repo_id:<19} @ {sha[:10]}  ({what})")
    sha = publish_to_cache(dataset, "example/target", cache, repo_type="dataset")
    log(f"{'example/target':<19} @ {sha[:10]}  (dataset, domain {target_domain})")
    return cache


def make_adapter_example(cache_dir: str | Path, adapters: int = 3, target_domain: int = 0, seed: int = 0,
                         log: Callable[[str], None] = print) -> Path:
    """Publish the base ``example/base``, LoRA adapters ``example/lora-{d}`` of it and the dataset
    ``example/target`` into ``cache_dir``; returns it."""
    with tempfile.TemporaryDirectory() as tmp:
        base, paths = build_adapters(Path(tmp), n_experts=adapters, seed=seed, base_name="example/base")
        data = write_dataset(Path(tmp) / "target", "sequence-classification", target_domain, seed=seed)
        return publish_adapter_example(cache_dir, base, paths, data, target_domain, log)


def publish_adapter_example(cache_dir: str | Path, base: Path, adapter_paths: list[Path], dataset: Path,
                            target_domain: int = 0, log: Callable[[str], None] = print) -> Path:
    """Publish a built base as ``example/base``, its adapters as ``example/lora-{d}`` (their configs must name
    ``example/base``) and ``dataset`` as ``example/target`` into ``cache_dir``."""
    models = [("example/base", base, "the adapters' base")]
    models += [(f"example/lora-{d}", path, f"LoRA adapter trained on domain {d}")
               for d, path in enumerate(adapter_paths)]
    return _publish(cache_dir, models, dataset, target_domain, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="example-hub", help="Hugging Face cache to publish into.")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm"])
    parser.add_argument("--experts", type=int, default=3, help="How many experts (one domain each).")
    parser.add_argument("--target-domain", type=int, default=0, help="Domain of the target dataset.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", action="store_true",
                        help="Publish the LoRA example: example/base and PEFT LoRA adapters example/lora-{d} "
                             "of it (sequence classification; --experts of them), plus example/target.")
    args = parser.parse_args()
    if args.adapters:
        if args.task != "sequence-classification":
            parser.error("--adapters builds sequence-classification adapters; drop --task.")
        cache = make_adapter_example(args.cache_dir, args.experts, args.target_domain, args.seed)
    else:
        cache = make_example(args.cache_dir, args.task, args.experts, args.target_domain, args.seed)
    print(f"Published into {cache}/ — use HF_HUB_CACHE={cache} HF_HUB_OFFLINE=1 with every hf-glue command "
          "and Python example that reads it.")


if __name__ == "__main__":
    main()
