"""What every `sdrt` command shares: the typer app, the error handling that maps typed errors to one line and
an exit code, and the lazy import of the exporter (the export extra)."""
from __future__ import annotations

import functools
import warnings

import typer

from .errors import MissingDependency, SdrtError

# typer >= 0.20 vendors click; take its exception classes from typer itself so either layout works.
UsageError = typer.BadParameter.__mro__[1]
ClickException = typer.BadParameter.__mro__[2]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="sdrt: a compiled inference runtime for Stable Diffusion.")
_state = {"debug": False}


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Every command: a typed error becomes one line on stderr and its exit code (a traceback with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except SdrtError as e:
            if _state["debug"]:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except (typer.Exit, typer.Abort, ClickException, BrokenPipeError):
            raise  # click's own handling (a closed pipe, as in `sdrt info B | head`, exits 1 quietly)
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", 1)
    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, (DeprecationWarning, FutureWarning)) and not _state["debug"]:
        return
    typer.echo(f"warning: {message}", err=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sdrt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
             version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")):
    _state["debug"] = debug


def _export_api(name: str):
    """A function of sdrt.export, or MissingDependency naming the export extra."""
    try:
        import torch  # noqa: F401  (first: the one a runtime-only install lacks)
        import diffusers  # noqa: F401, I001
        import onnx  # noqa: F401
        import transformers  # noqa: F401

        from . import export
    except ImportError as e:
        raise MissingDependency(f"exporting needs the export extra ({e.name or e} is missing): "
                                "pip install torch==2.13.0 'sdrt[export]'") from None
    return getattr(export, name)
