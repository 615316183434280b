"""Build argparse parsers from dataclass configs, and run commands with one-line errors.

A config is a dataclass whose fields carry a docstring (a string literal on the line after the
field); that docstring becomes the option's ``--help``. Field ``foo_bar`` becomes ``--foo-bar``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import MlsaeError


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, parsed from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _option_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse keyword arguments for a field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return _option_type(args[0]) if len(args) == 1 else (str, {})
    if origin is typing.Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple):
        inner = args[0] if args else str
        return inner, {"nargs": "+"}
    return annotation, {}


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, short: dict[str, str] | None = None, positional: Sequence[str] = ()
) -> None:
    """Add one option per field of ``cls``; fields without a default are required; the fields named in
    ``positional`` (required ones) are positional arguments instead, in field order."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    short = short or {}
    for field in dataclasses.fields(cls):
        if field.name in positional:
            parser.add_argument(field.name, metavar=field.name.upper(), help=docs.get(field.name, ""))
            continue
        flags = [f"--{field.name.replace('_', '-')}"]
        if field.name in short:
            flags.insert(0, short[field.name])
        kind, extra = _option_type(hints[field.name])
        help_text = docs.get(field.name, "")
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else (field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        )
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if has_default and default is not None:
            help_text = f"{help_text} (default: {default})"
        parser.add_argument(
            *flags, dest=field.name, type=kind, default=default, required=not has_default, help=help_text, **extra
        )


def config_from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Instantiate ``cls`` from the parsed options that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


# what the tools say after a Ctrl-C or a full disk, unless a command says otherwise (the cache's and the
# trainer's writes are atomic and resumable; mlsae-analyse passes its own words)
RESUMES = "what was finished is kept; run the same command again to resume"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_ATOMIC_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")  # mlsae_cache.atomic's ".NAME.XXXX.tmp"


def os_error_code(exc: BaseException) -> int | None:
    """The errno of an OS-level failure: ``exc.errno``, or the code a Rust library (polars, safetensors)
    wrote into its message ("os error 28", "code: 28"); None when there is none."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    found = re.search(r"os error (\d+)|code: (\d+)", str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def _written_path(exc: BaseException) -> str:
    """The file an OSError names, as the user knows it (an atomic write's temporary name -> the final name)."""
    name = getattr(exc, "filename", None)
    if not name:
        return "the output"
    path = Path(str(name))
    temporary = _ATOMIC_TEMPORARY.fullmatch(path.name)
    return str(path.with_name(temporary["name"]) if temporary else path)


def os_error_message(exc: BaseException, resumes: str = RESUMES) -> str | None:
    """One line naming the path and the fix for a full disk, a denied write or a read-only disk; None otherwise."""
    code = os_error_code(exc)
    where = _written_path(exc)
    if code in _DISK_FULL:
        return f"disk full while writing {where} (no space left on the device); free space, then: {resumes}"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write to {where}: permission denied; choose a writable --out (or make {where} accessible)"
    if code == errno.EROFS:
        return f"cannot write to {where}: read-only file system; choose an --out on a writable disk"
    return None


def run_command(
    entry: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *, resumes: str = RESUMES
) -> int:
    """Run a command; turn user errors into one line on stderr and a non-zero exit code.

    ``resumes`` is what the command keeps after a Ctrl-C or a full disk, and how to go on from there.
    """
    try:
        return int(entry(argv) or 0)
    except SystemExit as exc:  # argparse: --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except MlsaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {resumes}", file=sys.stderr)
        return 130
    except OSError as exc:
        message = os_error_message(exc, resumes)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 28 if os_error_code(exc) in _DISK_FULL else 2


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error of the tools."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(2, f"error: {message}; see {self.prog} --help\n")
