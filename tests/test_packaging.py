"""Installs ship the card templates: the top-level model_cards/ folder is the package hf_glue.model_cards in a
built wheel and in an editable install (pyproject.toml's package-dir, setup.py's package list).

Each test builds from a clean copy of the project's packaging inputs (never a stale build/ folder, nothing
written into the checkout), installs into a throw-away venv that sees this Python's packages
(its site directories; offline: --no-index, --no-build-isolation) and renders a card there, from the example
merge_result.json, with the `hf-glue card` command. About 15-25 s each on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "src", "model_cards")
EXAMPLE = ROOT / "model_cards" / "examples" / "merge.merge_result.json"
#: run in the venv: where hf_glue and its templates come from, then the card command
PROBE = """
import sys
from pathlib import Path
if {drop}:  # an editable install is a meta-path finder: drop any other checkout this Python's .pth files add
    sys.path = [p for p in sys.path if not Path(p, "hf_glue").is_dir()]
from importlib.resources import files
import hf_glue, hf_glue.model_cards
from hf_glue.report.card import TEMPLATE
print(hf_glue.__file__)
print(files("hf_glue.model_cards").joinpath("merge.md"))
print(TEMPLATE)
from hf_glue.commands import main
sys.argv = ["hf-glue", "card", sys.argv[1]]
main()
"""


def _project(tmp: Path) -> Path:
    project = tmp / "project"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "examples"))
        else:
            project.mkdir(exist_ok=True)
            shutil.copy2(source, project / name)
    return project


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _venv(tmp: Path) -> Path:
    """A throw-away venv that sees this Python's packages: its site directories are added (their .pth files run,
    as --system-site-packages would do for a base interpreter; from inside a venv that flag would expose the base
    interpreter's packages instead, without torch). pip too is this Python's."""
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    own = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    outer = [p for p in [*site.getsitepackages(), *user] if Path(p).is_dir()]
    (own / "outer-site.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    return python


def _render(python: Path, tmp: Path, drop: bool) -> list[str]:
    """Render a card in the venv; returns the probe's lines (hf_glue, the template resource, TEMPLATE)."""
    folder = tmp / "output"
    folder.mkdir()
    shutil.copy2(EXAMPLE, folder / "merge_result.json")
    done = _run(python, "-c", PROBE.format(drop=drop), folder, cwd=tmp)
    card = (folder / "README.md").read_text()
    result = json.loads(EXAMPLE.read_text())
    assert card.startswith("---\n") and "base_model_relation: merge" in card
    assert "## Coefficients" in card and result["command"] in card
    assert "### Configuration" in card and "merge_method: linear" in (folder / "mergekit_config.yml").read_text()
    return done.stdout.splitlines()[:3]


def test_a_built_wheel_ships_the_templates_and_renders_cards(tmp_path):
    project = _project(tmp_path)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         tmp_path / "dist", project)
    (wheel,) = (tmp_path / "dist").glob("hf_glue-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_glue/model_cards/merge.md" in names and "hf_glue/model_cards/__init__.py" in names
    assert not [n for n in names if "examples/" in n or n.startswith("model_cards/")]
    assert "hf_glue/metrics/accuracy/accuracy.py" in names and "hf_glue/report/mergekit.py" in names
    python = _venv(tmp_path)
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-warn-script-location",
         wheel)
    module, resource, template = _render(python, tmp_path, drop=False)
    site = (tmp_path / "venv").resolve()
    for path in (module, resource, template):  # the wheel's files, not the checkout's
        assert Path(path).resolve().is_relative_to(site), path
    assert Path(template).name == "merge.md" and Path(template).parent.name == "model_cards"


def test_an_editable_install_maps_the_top_level_folder(tmp_path):
    project = _project(tmp_path)
    python = _venv(tmp_path)
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed",
         "--no-warn-script-location", "-e", project)
    module, resource, template = _render(python, tmp_path, drop=True)
    assert Path(module).resolve() == (project / "src" / "hf_glue" / "__init__.py").resolve()
    assert Path(resource).resolve() == Path(template).resolve() == (project / "model_cards" / "merge.md").resolve()
