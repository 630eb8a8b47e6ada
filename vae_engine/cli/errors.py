"""The CLI's one error policy: every failure a user can cause is one `error:` line on stderr and exit code 2, never
a traceback; usage errors too; Ctrl-C (and SIGTERM) exit 130 after cleaning up."""

from __future__ import annotations

import functools
import os
import sys

import typer

from ..core.errors import Interrupted, VaeEngineError, first_line, missing_dependency, os_error_reason

try:  # recent Typer releases carry their own copy of click; older ones use click itself
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

# Ctrl-C during parsing: click's Abort, which newer Typer releases define in typer.exceptions instead
ABORT = getattr(click_exc, "Abort", None) or getattr(typer.exceptions, "Abort", KeyboardInterrupt)
DEBUG_ENV = "VAE_ENGINE_DEBUG"  # set to 1 to see tracebacks of unexpected errors


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (unknown option, bad number, value out of range) as one `error:` line and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except click_exc.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            code = 0
        except click_exc.ClickException as exc:
            where = getattr(getattr(exc, "ctx", None), "command_path", None) or "vae-engine"
            typer.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            code = 2
        except ABORT:
            typer.echo("interrupted", err=True)
            code = 130
        except BrokenPipeError:  # `vae-engine info | head`: the reader left; nothing to report
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush stays quiet
            code = 1
        if standalone_mode:
            sys.exit(code or 0)
        return code


def _interrupted(exc: BaseException) -> bool:
    """Whether an exception is, or was caused by, Ctrl-C/SIGTERM (libraries sometimes wrap KeyboardInterrupt)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def friendly(fn):
    """Every failure as one `error:` line on stderr and exit code 2 (never a traceback); Ctrl-C as exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:
            typer.echo(f"interrupted: {exc}", err=True)
            raise typer.Exit(130) from None
        except VaeEngineError as exc:
            message = str(exc)
        except (typer.Exit, click_exc.ClickException):
            raise
        except BaseException as exc:
            # an optional library this command needs and this install lacks (torch for train and export, ...)
            missing = missing_dependency(exc, f"`vae-engine {fn.__name__.replace('_', '-')}`") \
                if isinstance(exc, ImportError) else None
            if missing is not None and not os.environ.get(DEBUG_ENV):
                typer.echo(f"error: {missing}", err=True)
                raise typer.Exit(2) from None
            if _interrupted(exc):
                typer.echo("interrupted: no output was written", err=True)
                raise typer.Exit(130) from None
            if os.environ.get(DEBUG_ENV) or isinstance(exc, SystemExit):
                raise
            if isinstance(exc, MemoryError):
                message = "out of memory; use a smaller --batch-size or --k, or a machine with more memory"
            elif isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                message = f"{where}{os_error_reason(exc)}"
            else:
                first = first_line(exc)
                message = (f"unexpected {type(exc).__name__}: {first} (a bug or an input we do not check yet; "
                           f"rerun with {DEBUG_ENV}=1 for the traceback and please report it)")
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        raise typer.Exit(2) from None

    return wrapper
