"""Options from the dataclass configs (`HfArgumentParser`), with ``--config FILE.yaml`` as defaults.

Flags on the command line override the file; unknown keys in the file are errors.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from ..errors import GlueError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description's examples keep their lines."""


def add_command_parser(subparsers, name: str, help: str, description: str, configs: Sequence[type]):
    parser = subparsers.add_parser(
        name, help=help, description=description, dataclass_types=list(configs),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win).")
    return parser


def build_configs(parser, configs: Sequence[type], argv: Sequence[str]) -> list:
    """Parse ``argv`` into the dataclasses (then the namespace of any other options), taking defaults from
    ``--config FILE.yaml`` when given."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GlueError("--config needs a YAML file path.")
        path = Path(argv[i + 1])
        del argv[i: i + 2]
        parser.set_defaults(**_read_yaml(path, configs))
    try:
        outputs = list(parser.parse_args_into_dataclasses(args=argv))
    except GlueError:  # raised by a config's own validation: already says what to do
        raise
    except (TypeError, ValueError) as err:
        raise GlueError(str(err)) from None
    # options that are not dataclass fields (--config, positionals) come back as a trailing namespace
    return outputs if len(outputs) > len(configs) else outputs + [argparse.Namespace()]


def _read_yaml(path: Path, configs: Sequence[type]) -> dict:
    import yaml

    if not path.is_file():
        raise GlueError(f"config file {str(path)!r} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise GlueError(f"config file {str(path)!r} must hold a mapping of option: value.")
    known = {f.name for c in configs for f in fields(c)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GlueError(f"unknown options in {str(path)!r}: {unknown}; remove them or check their spelling.")
    return values
