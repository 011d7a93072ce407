"""hf-glue's model card templates, shipped as the package ``hf_glue.model_cards``.

This folder lives at the top of the repository; pyproject.toml maps it into the package (``package-dir``), so a
wheel holds ``hf_glue/model_cards/*.md`` and an editable install imports ``hf_glue.model_cards`` from here. The
rendered examples beside the templates (``examples/``) are not packaged: ``scripts/render_card_examples.py``
writes them and tests/test_card_examples.py keeps them in sync with the templates.
"""
