"""The command line: every subcommand has help, and the light paths stay light."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pctop import __version__
from pctop.cli import SUBCOMMANDS, cli
from tests.conftest import cli_in_fresh_interpreter, run_pctop


def test_top_level_help_lists_every_subcommand():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0, r.output
    for name in SUBCOMMANDS:
        assert name in r.output


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name):
    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and name in r.output


def test_version():
    r = run_pctop("--version")
    assert r.returncode == 0
    assert __version__ in r.stdout


def test_unknown_subcommand_is_a_one_line_usage_error():
    r = run_pctop("no-such-command")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "No such command" in r.stderr


def test_help_imports_neither_textual_nor_bcc():
    seen = cli_in_fresh_interpreter(["--help"]).imported
    assert seen == {"textual": False, "bcc": False, "rich": False}


def test_subcommand_help_imports_neither_textual_nor_bcc():
    for name in SUBCOMMANDS:
        seen = cli_in_fresh_interpreter([name, "--help"]).imported
        assert not seen["textual"] and not seen["bcc"], (name, seen)
