"""Render the example model cards in ``model_cards/examples/`` from the stored results beside them.

Each example is the card hf-glue writes for a real run of the bundled example (``scripts/make_example.py``),
rendered from that run's stored ``merge_result.json`` (and ``compare.json``), with the mergekit configuration
built from the saved model's tensor names (``*.tensors.json``):

- ``merge.md``: the quick start's full merge (``hf-glue merge --experts example/expert-{0,1,2}``);
- ``lora.md``: a merge of the LoRA example's adapters (``--experts example/lora-{0,1,2} --granularity block``);
- ``comparison.md``: the full merge's card with an ``hf-glue compare`` table (``hf-glue card merged --compare``).

    python scripts/render_card_examples.py            # re-render the .md files from the stored results
    python scripts/render_card_examples.py --check    # exit 1 if a .md file differs from its rendering
    python scripts/render_card_examples.py --rerun    # rerun the example's commands first (a few minutes)

tests/test_card_examples.py re-renders them and compares, so a template change without re-rendering fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "model_cards" / "examples"
#: example → (its stored result, the stored comparison or None)
CARDS = {
    "merge": ("merge", None),
    "lora": ("lora", None),
    "comparison": ("merge", "comparison.compare.json"),
}
#: the runs the stored results come from (in a scratch folder, with the example's cache variables)
RUNS = [
    "{python} {root}/scripts/make_example.py --cache-dir example-hub",
    "{python} {root}/scripts/make_example.py --cache-dir example-hub --adapters",
    "hf-glue merge --experts example/expert-0 example/expert-1 example/expert-2 --dataset example/target "
    "--output-dir merged",
    "hf-glue merge --experts example/lora-0 example/lora-1 example/lora-2 --dataset example/target "
    "--output-dir merged-lora --granularity block",
    "hf-glue compare --experts example/expert-0 example/expert-1 example/expert-2 --dataset example/target "
    "--data-sizes 100 400 200 --seeds 0 --output-dir compare",
]


def render(name: str, folder: Path = EXAMPLES) -> str:
    """The card of example ``name`` from the stored files in ``folder``."""
    from hf_glue.report.card import generate_card
    from hf_glue.report.mergekit import mergekit_config

    stem, compare = CARDS[name]
    result = json.loads((folder / f"{stem}.merge_result.json").read_text())
    tensors = json.loads((folder / f"{stem}.tensors.json").read_text())
    comparison = json.loads((folder / compare).read_text())["card"] if compare else None
    return generate_card(result, comparison=comparison, mergekit_yaml=mergekit_config(result, tensors))


def rerun(folder: Path) -> None:
    """Run the example's commands in a scratch folder and store their results in ``folder``."""
    from hf_glue.report.mergekit import saved_tensors

    with tempfile.TemporaryDirectory(prefix="hf-glue-card-examples-") as scratch:
        env = {**os.environ, "HF_HUB_CACHE": "example-hub", "HF_HUB_OFFLINE": "1"}
        for command in RUNS:
            command = command.format(python=sys.executable, root=ROOT)
            print("$", command, flush=True)
            subprocess.run(command, shell=True, check=True, cwd=scratch, env=env)
        for out, stem in (("merged", "merge"), ("merged-lora", "lora")):
            shutil.copy(Path(scratch, out, "merge_result.json"), folder / f"{stem}.merge_result.json")
            names = saved_tensors(Path(scratch, out))
            (folder / f"{stem}.tensors.json").write_text(json.dumps(names, indent=1) + "\n")
        shutil.copy(Path(scratch, "compare", "compare.json"), folder / "comparison.compare.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--rerun", action="store_true", help="rerun the example's commands to refresh the results")
    args = parser.parse_args(argv)
    if args.rerun:
        rerun(EXAMPLES)
    stale = []
    for name in CARDS:
        path = EXAMPLES / f"{name}.md"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"Wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} is out of date: run python scripts/render_card_examples.py")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
