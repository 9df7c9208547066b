"""The `vitpipe` command line: parse, load config, call one function per command.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error (one line, no traceback),
75 (EX_TEMPFAIL) training stopped by a signal after checkpointing: rerun with --resume auto.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from vitpipe.cli import compare, curate, data, evaluate, serve, train
from vitpipe.cli.common import DEBUG_ENV, EXIT_USAGE, error_line, runtime_failure_line
from vitpipe.config import ConfigError

HELP = ("vitpipe: self-supervised ViT pretraining from raw images to numbers. ingest shards, pretrain "
        "mae|clip|igpt|jepa|dino (or an installed plugin's objective), eval the representation, report, export.")

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")
shards_app = typer.Typer(help="Inspect and check shard sets.", no_args_is_help=True)
config_app = typer.Typer(help="Show resolved configs.", no_args_is_help=True)
eval_app = typer.Typer(help="How good is the representation: probes, k-NN, retrieval, fine-tuning.",
                       no_args_is_help=True)
slurm_app = typer.Typer(help="Run vitpipe commands as SLURM jobs that survive preemption.", no_args_is_help=True)
palette_app = typer.Typer(help="Colour palettes for pixel-sequence models (igpt).", no_args_is_help=True)
for name, sub in (("shards", shards_app), ("config", config_app), ("eval", eval_app), ("slurm", slurm_app),
                  ("palette", palette_app)):
    app.add_typer(sub, name=name)

app.command()(data.ingest)
shards_app.command("verify")(data.shards_verify)
config_app.command("show")(data.config_show)
app.command()(train.pretrain)
app.command()(train.export)
app.command()(train.report)
app.command()(train.demo)
app.command()(train.plan)
slurm_app.command("render")(train.slurm_job)
slurm_app.command("submit")(train.slurm_job)
eval_app.command("linear-probe")(evaluate.eval_linear_probe)
eval_app.command("knn")(evaluate.eval_knn)
eval_app.command("retrieval")(evaluate.eval_retrieval)
eval_app.command("finetune")(evaluate.eval_finetune)
eval_app.command("suite")(compare.eval_suite)
app.command()(compare.compare)
app.command()(curate.curate)
app.command()(serve.serve)
palette_app.command("fit")(data.palette_fit)

NO_OBJECTIVE_COMMANDS = {"ingest", "shards", "config", "curate", "serve", "palette", "--version"}
"""Root commands that never need the objectives' own: they start without importing torch."""
_added: list = []
"""(typer app, command info) of the objective commands the last ``main`` call added."""


def add_objective_commands(argv: list[str]) -> None:
    """Add the commands the registered objectives declare (``ObjectiveSpec.commands``: CLIP's `eval
    zero-shot`, iGPT's `eval bits-per-dim` and `sample`, a plugin's) unless ``argv`` names a command
    that cannot use them; those of an earlier call go first (the registry may have changed). A name
    already taken keeps its first owner, with a warning."""
    for typer_app, info in _added:
        typer_app.registered_commands.remove(info)
    _added.clear()
    if argv and argv[0] in NO_OBJECTIVE_COMMANDS:
        return
    from vitpipe.ssl import registry

    groups = {"eval": eval_app, "": app}
    taken = {group: {command.name or command.callback.__name__.replace("_", "-")
                     for command in typer_app.registered_commands} | {g.name for g in typer_app.registered_groups}
             for group, typer_app in groups.items()}
    for spec in registry.OBJECTIVES.values():
        for command in spec.commands:
            if command.group not in groups or command.name in taken[command.group]:
                print(f"warning: objective {spec.name!r}: command {command.group} {command.name} is not free; left out",
                      file=sys.stderr)
                continue
            taken[command.group].add(command.name)
            groups[command.group].command(command.name)(command.function)
            _added.append((groups[command.group], groups[command.group].registered_commands[-1]))


def _print_version(value: bool) -> None:
    if value:
        from vitpipe import __version__

        typer.echo(f"vitpipe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of a runtime failure.")] = False,
          version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Options for every command."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(UsageError, ClickException) classes of click and of the copy newer typer releases vendor
    (``typer._click``), whichever are installed: both raise their own."""
    import importlib

    modules = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    return tuple(m.UsageError for m in modules), tuple(m.ClickException for m in modules)


def main(argv: list[str] | None = None) -> int:
    """Entry point; also callable from tests as ``main([...])`` returning the exit code."""
    try:
        add_objective_commands([arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--debug"])
        # without standalone mode click returns the exit code of typer.Exit instead of exiting
        result = app(args=argv, prog_name="vitpipe", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as exit_:
        code = exit_.exit_code
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except ConfigError as err:
        error_line(str(err))
        code = EXIT_USAGE
    except (typer.BadParameter, typer.Abort) as err:
        error_line(str(err))
        code = EXIT_USAGE
    except Exception as err:
        usage_errors, click_errors = _click_exception_types()
        if isinstance(err, usage_errors):
            err.show()
            code = EXIT_USAGE
        elif isinstance(err, click_errors):
            err.show()
            code = err.exit_code
        elif os.environ.get(DEBUG_ENV):
            raise
        else:
            error_line(runtime_failure_line(err))
            code = 1
    finally:
        from vitpipe.pipeline.workers import kill_leftover_workers

        kill_leftover_workers()
    if argv is None:
        sys.exit(code)
    return code
