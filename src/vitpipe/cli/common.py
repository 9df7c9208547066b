"""What every command shares: one `error:` line and exit code 2 for mistakes a user can fix, one
line and exit code 1 for runtime failures (tracebacks behind --debug / VITPIPE_DEBUG=1)."""

from __future__ import annotations

import functools

import typer

from vitpipe.config import ConfigError

EXIT_USAGE = 2
DEBUG_ENV = "VITPIPE_DEBUG"


def error_line(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def runtime_failure_line(err: BaseException) -> str:
    """One line for a failure at run time; the traceback stays behind --debug / VITPIPE_DEBUG=1."""
    from vitpipe.ssl.engine.checkpoints import is_disk_full

    if is_disk_full(err):
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        return f"disk full{where}; free space and rerun (finished work is kept)"
    text = (str(err).strip().splitlines() or [""])[0]
    known = ("TrainingError", "DataError", "CheckpointError", "WorkerError", "IngestFailed")  # their messages are written for users
    prefix = "" if type(err).__name__ in known else f"{type(err).__name__}: "
    return f"{prefix}{text} (traceback: rerun with --debug or {DEBUG_ENV}=1)"


def user_errors(command):
    """Turn the errors a user can fix (bad config, paths, inputs) into one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            error_line(str(err))
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper
