"""Build the bundled example: three tiny experts fine-tuned from one base on different domains, plus a target
dataset from the first expert's domain, published into a local Hugging Face cache so that repo ids resolve
offline.

    python scripts/make_example.py --cache-dir example-hub
    HF_HUB_CACHE=example-hub HF_HUB_OFFLINE=1 hf-glue merge \
        --experts example/expert-0 example/expert-1 example/expert-2 --dataset example/target --output-dir merged
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hf_glue.testing import build_experts, publish_to_cache, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="example-hub", help="Hugging Face cache to publish into.")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm"])
    parser.add_argument("--experts", type=int, default=3, help="How many experts (one domain each).")
    parser.add_argument("--target-domain", type=int, default=0, help="Domain of the target dataset.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for d, path in enumerate(build_experts(Path(tmp), task=args.task, n_experts=args.experts, seed=args.seed)):
            sha = publish_to_cache(path, f"example/expert-{d}", cache)
            print(f"example/expert-{d}  @ {sha[:10]}  (fine-tuned on domain {d})")
        data = write_dataset(Path(tmp) / "target", args.task, args.target_domain, seed=args.seed)
        sha = publish_to_cache(data, "example/target", cache, repo_type="dataset")
        print(f"example/target    @ {sha[:10]}  (dataset, domain {args.target_domain})")
    print(f"Published into {cache}/ — use HF_HUB_CACHE={cache} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
