"""The ``blissctl`` command: one sub-command per module of this package."""

from __future__ import annotations

import inspect

import typer

from blissctl import __version__

app = typer.Typer(
    name="blissctl",
    help=(
        "Select pretraining data with BLISS and pretrain on it.\n\n"
        "Example: blissctl select --input 'c4/en/c4-train.*.json.gz' --budget 30% --run c4-random"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blissctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Select pretraining data with BLISS and pretrain on it."""


def _help(doc: str | None) -> str:
    """A module docstring as --help text: paragraphs kept, the line breaks inside them dropped (rich
    re-wraps to the terminal, and kept breaks would wrap twice)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _register() -> None:
    # Each command module imports torch and friends lazily, inside its command, so that
    # `blissctl --help` stays quick.
    from blissctl import dashboard, demo, eval, export, pretrain, rounds, select, train_scorer

    app.command("train-scorer", help=_help(train_scorer.__doc__))(train_scorer.train_scorer_command)
    app.command("select", help=_help(select.__doc__))(select.select_command)
    app.command("pretrain", help=_help(pretrain.__doc__))(pretrain.pretrain_command)
    app.command("eval", help=_help(eval.__doc__))(eval.eval_command)
    app.command("export", help=_help(export.__doc__))(export.export_command)
    app.command("dashboard", help=_help(dashboard.__doc__))(dashboard.dashboard_command)
    app.command("demo", help=_help(demo.__doc__))(demo.demo_command)
    app.command("rounds", help=_help(rounds.__doc__))(rounds.rounds_command)


_register()


def main() -> None:
    from engine.runtime import reuse_freed_memory

    reuse_freed_memory()  # the scorers, train-scorer and eval run torch in this process
    app()


if __name__ == "__main__":
    main()
