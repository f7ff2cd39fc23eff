"""What every furl_fast command line shares: logging set-up and tyro parsing with readable help."""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
import typing
import warnings
from collections.abc import Sequence
from typing import Any, Literal

RANDOM_WEIGHTS_START = "load_encoder: pretrained='none'"


class _QuietThirdParty(logging.Filter):
    """open_clip logs through the root logger; its warning that it made a model with random weights
    repeats furl_fast's own (which says what that means for the rewards)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and
                    record.getMessage().startswith("No pretrained weights loaded"))


def setup_logging(fmt: str = "%(levelname)s %(name)s: %(message)s", **kwargs: Any) -> None:
    """furl_fast's INFO lines, and only warnings from other libraries (no OpenGL or open_clip INFO)."""
    logging.basicConfig(level=logging.WARNING, format=fmt, **kwargs)
    logging.getLogger("furl_fast").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietThirdParty())
    # load_encoder also raises a UserWarning for Python callers; on a command line its log line is
    # the one message.
    warnings.filterwarnings("ignore", message=RANDOM_WEIGHTS_START, category=UserWarning)


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it, two units at most: 45s, 12m30s, 3h05m, 2d04h."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 86400}d{s // 3600 % 24:02d}h"


def _optional_literal_rule(info):
    """`Literal[...] | None` fields (None: chosen from other settings) offer only the literals as
    choices; None stays the default."""
    from tyro.constructors import PrimitiveConstructorSpec

    args = typing.get_args(info.type)
    if typing.get_origin(info.type) not in (typing.Union, types.UnionType) or len(args) != 2 \
            or type(None) not in args:
        return None
    (literal,) = (a for a in args if a is not type(None))
    if typing.get_origin(literal) is not Literal:
        return None
    choices = tuple(str(c) for c in typing.get_args(literal))
    return PrimitiveConstructorSpec(
        nargs=1, metavar="{" + ",".join(choices) + "}", instance_from_str=lambda a: a[0],
        is_instance=lambda v: v is None or v in choices, str_from_instance=lambda v: [str(v)],
        choices=choices)


def join_lines(text: str) -> str:
    """A docstring's source lines joined into sentences (PEP 257 indentation removed first); blank
    lines, indented lines (examples) and "- " items keep their line breaks."""
    lines: list[str] = []
    for line in inspect.cleandoc(text).split("\n"):
        if lines and lines[-1] and line and not line[0].isspace() and not line.startswith("- ") \
                and not lines[-1][0].isspace():
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


@contextlib.contextmanager
def _joined_docstring_lines():
    """tyro (1.0) starts a new help line wherever a docstring's source line does not start with a
    letter, and it looks before removing the indentation, so every continuation line of a field
    docstring became a line break of its own in --help. Joining the lines first avoids that. tyro
    offers no public option for it; without the join, train's --help breaks dozens of sentences in
    mid-line (python_tests/test_cli_help.py counts them)."""
    from tyro import _strings

    original = getattr(_strings, "remove_single_line_breaks", None)
    if original is None:  # a tyro without this helper: nothing to fix
        yield
        return
    _strings.remove_single_line_breaks = lambda text: original(join_lines(text))
    try:
        yield
    finally:
        _strings.remove_single_line_breaks = original


def tyro_cli(cls: type, *, prog: str, args: Sequence[str] | None = None, **kwargs: Any):
    """tyro.cli(cls) with the usage line naming `prog` (not the module's file path), `Literal | None`
    fields without a None choice, and docstrings wrapped as sentences."""
    import tyro
    from tyro.constructors import ConstructorRegistry

    registry = ConstructorRegistry()
    registry.primitive_rule(_optional_literal_rule)
    with _joined_docstring_lines():
        return tyro.cli(cls, prog=prog, args=args, registry=registry, **kwargs)
