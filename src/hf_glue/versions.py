"""Versions of the libraries a result depends on (recorded in merge_result.json and the card)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("hf-glue", "torch", "transformers", "accelerate", "datasets", "huggingface_hub", "safetensors")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the core libraries and of ``extra`` (e.g. the optimiser package a method used)."""
    out = {}
    for name in LIBRARIES + tuple(extra):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
