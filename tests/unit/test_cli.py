"""The command line: every subcommand has help, and the light paths stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pctop import __version__
from pctop.cli import SUBCOMMANDS, cli
from tests.conftest import ROOT, run_pctop


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


def _modules_after(argv: list[str]) -> dict:
    """Run the CLI with argv in a fresh interpreter and report what it imported."""
    code = (
        "import sys, json\n"
        "from pctop.cli import cli\n"
        "try:\n"
        f"    cli.main({argv!r}, prog_name='pctop', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "mods = set(sys.modules)\n"
        "print(json.dumps({m: any(x == m or x.startswith(m + '.') for x in mods)"
        " for m in ('textual', 'bcc', 'rich')}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_imports_neither_textual_nor_bcc():
    seen = _modules_after(["--help"])
    assert seen == {"textual": False, "bcc": False, "rich": False}


def test_subcommand_help_imports_neither_textual_nor_bcc():
    for name in SUBCOMMANDS:
        seen = _modules_after([name, "--help"])
        assert not seen["textual"] and not seen["bcc"], (name, seen)
