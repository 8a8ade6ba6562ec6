"""The ``blissctl`` command: one sub-command per module of this package."""

from __future__ import annotations

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


def _register() -> None:
    # Each command module imports torch and friends lazily, inside its command, so that
    # `blissctl --help` stays quick.
    from blissctl import dashboard, eval, pretrain, select, train_scorer

    app.command("train-scorer", help=train_scorer.__doc__)(train_scorer.train_scorer_command)
    app.command("select", help=select.__doc__)(select.select_command)
    app.command("pretrain", help=pretrain.__doc__)(pretrain.pretrain_command)
    app.command("eval", help=eval.__doc__)(eval.eval_command)
    app.command("dashboard", help=dashboard.__doc__)(dashboard.dashboard_command)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
