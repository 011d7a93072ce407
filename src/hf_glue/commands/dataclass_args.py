"""An `argparse` parser built from dataclass configs, as transformers' `HfArgumentParser` builds it, without
importing transformers (about a second and a half): `hf-glue merge --help` and argument errors come at once.

Same options as `HfArgumentParser` for the field types the configs use: ``--name`` and ``--na-me``; ``Optional[X]``
as X; ``Literal[...]`` as choices; ``list[X]`` as ``nargs="+"``; ``bool`` as a flag that also takes a value
(``--cpu``, ``--cpu false``) and, when it defaults to True, ``--no-name`` too. Usage and help show a flag without
its optional value (``--cpu``, not ``--cpu [CPU]``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types
from typing import Any, Iterable, Iterator, Literal, Union, get_args, get_origin, get_type_hints

TRUE, FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


def string_to_bool(value: str | bool) -> bool:
    """``true``/``false`` (and yes/no, 1/0 …) as a bool, as `HfArgumentParser` reads flags."""
    if isinstance(value, bool):
        return value
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class DataclassArgumentParser(argparse.ArgumentParser):
    """One option per field of each dataclass in ``dataclass_types``; `parse_args_into_dataclasses` builds them."""

    def __init__(self, dataclass_types: Iterable[type] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataclass_types = list(dataclass_types)
        for cls in self.dataclass_types:
            hints = get_type_hints(cls)
            for field in dataclasses.fields(cls):
                if field.init:
                    self._add_field(field, hints[field.name])

    def _add_field(self, field: dataclasses.Field, kind: Any) -> None:
        options = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        kwargs: dict[str, Any] = dict(field.metadata)
        aliases = kwargs.pop("aliases", [])
        options += [aliases] if isinstance(aliases, str) else list(aliases)
        if get_origin(kind) in (Union, types.UnionType):  # Optional[X] → X
            args = [a for a in get_args(kind) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"field {field.name!r}: only Optional[X] unions are supported, got {kind}")
            kind = args[0]
        if not (kind in (str, int, float, bool) or get_origin(kind) in (Literal, list)):
            raise TypeError(f"field {field.name!r}: type {kind} has no command-line form here")
        has_default = field.default is not dataclasses.MISSING
        default = (field.default if has_default else field.default_factory()
                   if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if get_origin(kind) is Literal:
            choices = get_args(kind)
            by_text = {str(c): c for c in choices}
            kwargs.update(choices=choices, type=lambda text: by_text.get(text, text))
        elif kind is bool:
            kwargs.update(type=string_to_bool, nargs="?", const=True, metavar="")
            default = False if default is dataclasses.MISSING else default
        elif get_origin(kind) is list:
            kwargs.update(type=get_args(kind)[0], nargs="+")
        else:
            kwargs.update(type=kind)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        self.add_argument(*options, **kwargs)
        if kind is bool and default is True:
            self.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                              dest=field.name, default=False, help=field.metadata.get("help"))

    #: fields a command cannot run without (given as flags or in --config): shown in the usage without brackets
    needed: tuple[str, ...] = ()

    def format_usage(self) -> str:
        with self._needed_shown():
            return super().format_usage()

    def format_help(self) -> str:
        with self._needed_shown():
            return super().format_help()

    @contextlib.contextmanager
    def _needed_shown(self) -> Iterator[None]:
        """Mark the needed options required while the usage is drawn (argparse itself never requires them: a
        --config file may give them)."""
        marked = [a for a in self._actions if a.dest in self.needed and a.option_strings and not a.required]
        for action in marked:
            action.required = True
        try:
            yield
        finally:
            for action in marked:
                action.required = False

    def parse_args_into_dataclasses(self, args: list[str] | None = None,
                                    return_remaining_strings: bool = False) -> tuple:
        """The dataclasses filled from ``args``, then a namespace of any options that are no field (when there
        are), then the arguments no option took (with ``return_remaining_strings``; else they are an error)."""
        namespace, remaining = self.parse_known_args(args=args)
        outputs: list[Any] = []
        for cls in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(cls) if f.init}
            outputs.append(cls(**{k: v for k, v in vars(namespace).items() if k in keys}))
            for key in keys:
                delattr(namespace, key)
        if vars(namespace):
            outputs.append(namespace)
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)


class FlagFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a bool flag as ``--cpu`` (it still takes ``--cpu false``), not ``--cpu [CPU]``."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.metavar == "" and action.nargs == "?":
            return ""
        return super()._format_args(action, default_metavar)

    def _format_usage(self, *args: Any, **kwargs: Any) -> str:
        return super()._format_usage(*args, **kwargs).replace(" ]", "]")

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return super()._format_action_invocation(action).rstrip().replace(" ,", ",")
