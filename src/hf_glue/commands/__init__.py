"""`hf-glue` command line: one module per subcommand (parsing only); each calls the same functions as the API.

Options come from the dataclasses in `config.py` (their help text is `--help`); ``--config FILE.yaml`` sets
defaults that flags on the command line override; unknown keys in the file are errors. Every user error is one
``hf-glue COMMAND: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys
from typing import Optional, Sequence

import importlib
from types import ModuleType

#: the subcommands; each is a module with HELP, DESCRIPTION, CONFIGS, run(args, parser) and optionally
#: add_arguments(parser) and NEEDED (the options it cannot run without), imported when the parser is built
#: (``--version`` needs none of them; none imports torch or transformers before its arguments are parsed)
COMMANDS = ("merge", "compare", "blend", "estimate", "push", "card")


def command(name: str) -> ModuleType:
    """The module of subcommand ``name``."""
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from importlib.metadata import version

    from .parsing import GlueArgumentParser, add_command_parser

    parser = argparse.ArgumentParser(
        prog="hf-glue",
        description="Gradient-free learning to unify experts (GLUE): merge fine-tuned checkpoints into one model "
        "for a new target domain.",
    )
    parser.add_argument("--version", action="version", version=f"hf-glue {version('hf-glue')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=GlueArgumentParser)
    parsers = {}
    for name in COMMANDS:
        module = command(name)
        parsers[name] = add_command_parser(subparsers, name, module.HELP, module.DESCRIPTION, module.CONFIGS,
                                           getattr(module, "NEEDED", ()))
        if hasattr(module, "add_arguments"):
            module.add_arguments(parsers[name])
    return parser, parsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # answered before torch and transformers are imported
        from importlib.metadata import version

        print(f"hf-glue {version('hf-glue')}")
        return 0
    from ..config import hub_environment
    from ..errors import GlueError, SearchInterrupted
    from ..io import hub
    from ..io.progress import quiet_library_bars

    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        guess = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"did you mean {guess[0]}?" if guess else f"choose one of {', '.join(COMMANDS)}."
        print(f"hf-glue: error: unknown command {argv[0]!r}; {hint}", file=sys.stderr)
        return 2
    parser, parsers = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help/version/usage errors and exits
        parser.print_help()
        return 2
    name = argv[0]
    hub.new_run()
    finished = False
    try:
        with quiet_library_bars():  # redirected output: lines, not redrawn bars (before datasets etc. load)
            code = command(name).run(argv[1:], parsers[name])
        finished = True
        return code
    except GlueError as err:
        print(f"hf-glue {name}: error: {err}", file=sys.stderr)
        return 1
    except SearchInterrupted as stop:
        if command("merge").is_main_process():
            again = hub_environment() + shlex.join(["hf-glue", name, *argv[1:]]
                                                   + ([] if "--resume" in argv else ["--resume"]))
            print(f"hf-glue {name}: {stop}; nothing else was written. Resume with: {again}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"hf-glue {name}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    finally:
        close_process_group(synchronize=finished)


def close_process_group(synchronize: bool = False) -> None:
    """Shut down torch.distributed (where a multi-process run started it) before the interpreter exits: left
    to exit handlers, gloo's threads can abort the process after its work is done. ``synchronize`` (every process
    finished the command): meet first, so that no process tears its connections down while another still uses
    them (a process aborted that way under load, once, after its work was done)."""
    if "torch.distributed" not in sys.modules:  # never started (and --help never imports torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
