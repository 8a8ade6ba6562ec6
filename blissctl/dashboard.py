"""PLACEHOLDER: being written now; replaced before it lands."""

from blissctl.common import fail


def dashboard_command() -> None:
    fail("not built yet")
