"""User-facing failures of every `lors-fast` command: one line ``Error: ...``, exit 1 (usage errors: 2).

:func:`install` (called once by ``lors_fast.cli``) wraps the callback of every registered command: any
exception that is not already a click exception becomes one line naming the problem (the library's
ValueError / FileNotFoundError / PermissionError / divergence messages name the bad value and what was
expected); a traceback is printed only with ``--debug`` (an option of the group and of every command) or
the environment variable ``LORS_FAST_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import traceback

import click

__all__ = ["DEBUG_ENV", "debug_enabled", "one_line", "install"]

DEBUG_ENV = "LORS_FAST_DEBUG"


def debug_enabled() -> bool:
    """True with ``--debug`` on the command line (any level) or ``LORS_FAST_DEBUG`` set to a true value."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.meta.get("lors_fast.debug"):
            return True
        ctx = ctx.parent
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(e: BaseException) -> str:
    """The exception as one line: OS errors as ``<reason>: <path>``, others by their message; an
    unexpected exception type is labelled as an internal error."""
    if isinstance(e, OSError) and e.strerror and e.filename and str(e).startswith("[Errno"):
        msg = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        msg = str(e) or type(e).__name__
    expected = (ValueError, OSError, RuntimeError, KeyError, click.ClickException)
    if not isinstance(e, expected) or type(e) in (RuntimeError, KeyError):
        msg = f"{msg} (internal error {type(e).__name__}; rerun with --debug for the traceback)"
    return " ".join(msg.split())


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta["lors_fast.debug"] = True
    return value


def _debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help=f"print the full traceback of an error (also: {DEBUG_ENV}=1)")


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException as e:
            e.message = " ".join(str(e.message).split())
            raise
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if debug_enabled():
                traceback.print_exc()
            raise click.ClickException(one_line(e)) from e

    return wrapper


def install(group: click.Group) -> None:
    """Add ``--debug`` to ``group`` and each of its commands and make their failures one-line errors."""
    if not any(p.name == "debug" for p in group.params):
        group.params.append(_debug_option())
    for cmd in group.commands.values():
        if getattr(cmd, "_lors_fast_guarded", False):
            continue
        if not any(p.name == "debug" for p in cmd.params):
            cmd.params.append(_debug_option())
        if cmd.callback is not None:
            cmd.callback = _guard(cmd.callback)
        cmd._lors_fast_guarded = True
