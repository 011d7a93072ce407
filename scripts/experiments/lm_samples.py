"""Held-out generation samples for the lm setup (docs/results.md): the same prompts continued by the best single
expert, the uniform blend and GLUE's blend (α: the mean of GLUE (model)'s α over the kept seeds of a budget).

    python scripts/experiments/lm_samples.py [--budget small] [--rows 3] [--tokens 40]

It reads the built experts from ./experiments/lm (run `run.py lm` first), blends with `hf-glue blend --weights`
(the users' path) into a temporary folder, and writes docs/results/lm/samples.md: for each prompt (the first 200
characters of a held-out target row), each model's greedy continuation and its perplexity on the row's true rest.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import hub_env  # noqa: E402
from setups import SETUPS  # noqa: E402

PROMPT_CHARS = 200


def glue_alpha(results: Path, budget: str) -> dict[str, float]:
    """GLUE (model)'s α, averaged over the seeds kept under ``results``/<budget>/seed*/model/."""
    runs = [r for f in sorted((results / budget).glob("seed*/model/compare.json"))
            for r in json.loads(f.read_text())["runs"] if r["method"] == "glue"]
    if not runs:
        raise SystemExit(f"no GLUE runs under {results / budget}: run `run.py lm --results-dir {results}` first")
    names = list(runs[0]["coefficients"])
    return {n: statistics.fmean(r["coefficients"][n] for r in runs) for n in names}


def continuation(model, tokenizer, prompt: str, tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -100:]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, no_repeat_ngram_size=3,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


def perplexity(model, tokenizer, prompt: str, rest: str) -> float:
    """exp(mean loss) of ``rest``'s tokens given ``prompt`` (within the model's 128 positions)."""
    import torch

    p, r = tokenizer(prompt).input_ids, tokenizer(rest).input_ids
    ids = (p + r)[:128]
    labels = [-100] * len(p) + r
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([labels[:128]])).loss
    return math.exp(float(loss))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="small", help="Whose GLUE α to use (default: small).")
    parser.add_argument("--rows", type=int, default=3, help="Held-out rows to continue (default 3).")
    parser.add_argument("--tokens", type=int, default=40, help="Greedy tokens per continuation (default 40).")
    parser.add_argument("--workdir", type=Path, default=Path("experiments/lm"))
    parser.add_argument("--results-dir", type=Path, default=Path("docs/results/lm"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data

    setup = SETUPS["lm"](data.default_cache(), False)
    alpha = glue_alpha(args.results_dir, args.budget)
    experts = list(alpha)
    best = "exp/lm-python"
    env = hub_env(args.workdir.resolve())
    rows = [r["text"] for r in setup.target_test]
    # half the test rows are Python, half licence text: take prompts from both halves
    picks = [rows[i * len(rows) // args.rows + (len(rows) // (2 * args.rows))] for i in range(args.rows)]
    with tempfile.TemporaryDirectory(prefix="hf-glue-lm-samples-") as tmp:
        folders = {}
        for label, weights in (("uniform", [1 / len(experts)] * len(experts)),
                               ("GLUE (model)", [alpha[e] for e in experts])):
            out = Path(tmp) / label.split()[0]
            weights = [*weights[:-1], 1 - sum(weights[:-1])]  # a convex combination to the last bit
            subprocess.run([sys.executable, "-m", "hf_glue", "blend", "--experts", *experts, "--weights",
                            *map(repr, weights), "--output-dir", str(out)], env=env, check=True, capture_output=True)
            folders[label] = str(out)
        local = args.workdir / "models" / best.split("-", 1)[1]  # the expert as built (published as `best`)
        models = {f"best expert ({best.split('-', 1)[1]})": AutoModelForCausalLM.from_pretrained(local).eval(),
                  **{label: AutoModelForCausalLM.from_pretrained(path).eval() for label, path in folders.items()}}
        tokenizer = AutoTokenizer.from_pretrained(local)
        shown = ", ".join(f"{e.split('-', 1)[1]} {alpha[e]:.2f}" for e in experts)
        lines = ["### lm: held-out generation samples", "",
                 f"Command: `python scripts/experiments/lm_samples.py --budget {args.budget} --rows {args.rows} "
                 f"--tokens {args.tokens}`", "",
                 f"GLUE's α: the mean of GLUE (model)'s α over the seeds of the {args.budget} budget "
                 f"({shown}). Each prompt is the first "
                 f"{PROMPT_CHARS} characters of a held-out target row; each model continues it greedily for "
                 f"{args.tokens} tokens (greedy, no repeated 3-gram: a 1.3M-parameter model loops otherwise); the perplexity is of the row's true rest given the prompt.", ""]
        for n, row in enumerate(picks, 1):
            prompt, rest = row[:PROMPT_CHARS], row[PROMPT_CHARS:]
            lines += [f"**Prompt {n}** (held-out row):", "", "```text", prompt, "```", ""]
            for label, model in models.items():
                text = continuation(model, tokenizer, prompt, args.tokens).replace("```", "'''")
                lines += [f"- {label}, perplexity of the true rest {perplexity(model, tokenizer, prompt, rest):.1f}:",
                          "", "  ```text", *("  " + line for line in text.splitlines() or [""]), "  ```", ""]
    (args.results_dir / "samples.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
