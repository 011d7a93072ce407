"""Options from the dataclass configs (`DataclassArgumentParser`, `HfArgumentParser`'s rules without importing
transformers), with ``--config FILE.yaml`` as defaults.

Flags on the command line override the file; unknown keys in the file and unknown flags are errors (one line,
with the closest option when there is one).
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from pathlib import Path
from typing import NoReturn, Sequence

from ..config import read_mapping_file
from ..errors import GlueError
from .dataclass_args import DataclassArgumentParser, FlagFormatter


class HelpFormatter(FlagFormatter):
    """Each option's default once: appended only where the help text does not give it already, and only when there
    is one to show (not None, False or an empty list); the description's examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default == [] or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class GlueArgumentParser(DataclassArgumentParser):
    """A dataclass parser whose usage errors are `GlueError`s: the CLI prints them as one line."""

    def error(self, message: str) -> NoReturn:
        raise GlueError(message)


def add_command_parser(subparsers, name: str, help: str, description: str, configs: Sequence[type],
                       needed: Sequence[str] = ()):
    parser = subparsers.add_parser(
        name, help=help, description=description, dataclass_types=list(configs), formatter_class=HelpFormatter,
        allow_abbrev=False,  # --step must not silently mean --steps, nor --expert replace --experts
    )
    parser.needed = tuple(needed)
    for action in parser._actions:  # --data_sizes still parses; help, usage and errors show --data-sizes only
        dashed = [s for s in action.option_strings if "_" not in s]
        if dashed:
            action.option_strings = dashed
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win).")
    return parser


def build_configs(parser, configs: Sequence[type], argv: Sequence[str]) -> list:
    """Parse ``argv`` into the dataclasses (then the namespace of any other options), taking defaults from
    ``--config FILE.yaml`` when given."""
    argv, config_file = _pop_config(list(argv))
    if config_file is not None:
        parser.set_defaults(**_read_yaml(config_file, configs))
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except GlueError:  # usage errors and the configs' own validation: already one line naming the option
        raise
    except (TypeError, ValueError) as err:
        raise GlueError(str(err)) from None
    if remaining:
        _refuse_unknown(parser, remaining)
    # options that are not dataclass fields (--config, positionals) come back as a trailing namespace
    return outputs if len(outputs) > len(configs) else outputs + [argparse.Namespace()]


def _pop_config(argv: list[str]) -> tuple[list[str], Path | None]:
    """``argv`` without ``--config FILE`` (or ``--config=FILE``), and that file."""
    found, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise GlueError("--config needs a YAML file path.")
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise GlueError(f"--config is given {len(found)} times ({', '.join(found)}); give one YAML file.")
    return rest, Path(found[0]) if found else None


def _refuse_unknown(parser: argparse.ArgumentParser, remaining: list[str]) -> NoReturn:
    """One line for the first argument no option takes, with the closest option name for a mistyped flag."""
    arg = remaining[0]
    if not arg.startswith("-"):
        raise GlueError(f"unexpected argument {arg!r}: no option takes it (quote values with spaces).")
    name = arg.split("=", 1)[0]
    options = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
    guess = difflib.get_close_matches(name.replace("_", "-"), options, n=1)
    hint = f"did you mean {guess[0]}?" if guess else f"see `{parser.prog} --help`."
    raise GlueError(f"unknown option {name}; {hint}")


def _read_yaml(path: Path, configs: Sequence[type]) -> dict:
    values = read_mapping_file(path, f"config file {str(path)!r} (--config takes a YAML file)", "option: value")
    known = {f.name for c in configs for f in fields(c)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GlueError(f"unknown options in {str(path)!r}: {unknown}; remove them or check their spelling.")
    return values

