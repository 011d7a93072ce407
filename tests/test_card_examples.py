"""The example cards in model_cards/examples/ are what the current template renders from their stored results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_card_examples", ROOT / "scripts" / "render_card_examples.py")
examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(examples)


@pytest.mark.parametrize("name", list(examples.CARDS))
def test_example_card_matches_its_rendering(name):
    path = ROOT / "model_cards" / "examples" / f"{name}.md"
    assert path.read_text() == examples.render(name), (
        f"{path.relative_to(ROOT)} is out of date: run python scripts/render_card_examples.py")


def test_examples_show_each_kind_of_card():
    from huggingface_hub import ModelCard

    merge, lora, comparison = (ModelCard.load(ROOT / "model_cards" / "examples" / f"{n}.md")
                               for n in ("merge", "lora", "comparison"))
    assert merge.data.base_model_relation == "merge" and "lora" not in merge.data.tags
    assert "lora" in lora.data.tags and "## Base model and how to load this" in lora.text
    assert "## Comparison with other merge methods" in comparison.text
    assert "## Comparison with other merge methods" not in merge.text
    for card in (merge, lora, comparison):
        assert "### Configuration" in card.text and "```yaml\n# This hf-glue merge" in card.text
