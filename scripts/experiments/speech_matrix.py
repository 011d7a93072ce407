"""The speech setup's experts are specialists: held-out accuracy (%) of its base and each expert on every accent.

    python scripts/experiments/speech_matrix.py [--workdir experiments/speech]

Reads the models `run.py speech` built in WORKDIR/models and scores each on 300 clips of every accent (the target's
test clips for the Italian voice, the same seed for the others), printing a markdown table (docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from setups import SPEECH_BASE, SPEECH_EXPERTS, SPEECH_TARGET  # noqa: E402


@torch.no_grad()
def accuracy(model, extractor, rows: list[dict], batch_size: int = 100) -> float:
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = extractor([r["audio"] for r in chunk], sampling_rate=data.SPEECH_RATE, return_tensors="pt",
                        padding=True)
        correct += int((model(**enc).logits.argmax(-1) == torch.tensor([r["label"] for r in chunk])).sum())
    return 100 * correct / len(rows)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("experiments/speech"))
    args = parser.parse_args(argv)
    cache = data.default_cache()
    accents = {"us (base)": SPEECH_BASE, **SPEECH_EXPERTS, "italian (target)": SPEECH_TARGET}
    tests = {name: data.spoken_digits(voice, 300, seed=3, cache=cache) for name, voice in accents.items()}
    models = {name: args.workdir / "models" / name for name in ["base", *SPEECH_EXPERTS]}
    extractor = AutoFeatureExtractor.from_pretrained(models["base"])
    print("| model | " + " | ".join(tests) + " |")
    print("|---" * (len(tests) + 1) + "|")
    for name, path in models.items():
        model = AutoModelForAudioClassification.from_pretrained(path).eval()
        print(f"| {name} | " + " | ".join(f"{accuracy(model, extractor, rows):.1f}" for rows in tests.values()) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
