"""Package discovery only; everything else is in pyproject.toml.

pyproject.toml's ``package-dir`` maps the top-level ``model_cards/`` folder to ``hf_glue.model_cards``. A
``packages.find`` table there only walks ``src/``, so the package list is given here: every package under src/
(found as ``packages.find`` did) and that one. Wheels and editable installs (`pip install -e .`) both honour
the mapping.
"""

from setuptools import find_namespace_packages, setup

# namespace discovery, as pyproject's packages.find did (folders such as metrics/accuracy have no __init__.py)
setup(packages=find_namespace_packages(where="src", exclude=["*__pycache__*"]) + ["hf_glue.model_cards"])
