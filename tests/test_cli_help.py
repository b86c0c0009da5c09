"""`twinfer --help` documents every flag with its default; a bad flag value is one clear line."""

from __future__ import annotations

import argparse

import pytest

from tests.cli_runner import run_twinfer
from twinfer.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "twinfer"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


SUBCOMMANDS = dict(_subcommands(build_parser()))


def test_every_command_is_checked() -> None:
    assert {"twinfer serve", "twinfer generate", "twinfer chat", "twinfer bench decode"} <= set(
        SUBCOMMANDS
    )


def _entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's entry in the printed help (its lines joined), keyed by every option string."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in [*parser.format_help().splitlines(), ""]:
        if line.startswith("  -") or not line.startswith(" "):
            if current:
                entry = " ".join(" ".join(current).split())
                for option in entry.split(" ", 1)[0].split(","):
                    entries.setdefault(option, entry)
            current = [line] if line.startswith("  -") else []
        elif current:
            current.append(line)
    return {**entries, **{k.rstrip(","): v for k, v in entries.items()}}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    parser = SUBCOMMANDS[command]
    entries = _entries(parser)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help, f"{command} {flag} has no help text"
        default = action.default
        if default is None or default is False and not action.nargs:
            continue  # no value to show (its help says what happens); a switch is off
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert "default" in entries[flag], f"{command} {flag}: no default in {entries[flag]!r}"


def test_serve_help_names_the_defaults_users_ask_for() -> None:
    text = " ".join(SUBCOMMANDS["twinfer serve"].format_help().split())
    for expected in (
        "--port PORT Port to listen on (0 to 65535). (default: 8000)",
        "(default: 0.0.0.0)",
        "Most sequences in one step. (default: 256)",
        "Tokens per KV cache block. (default: 16)",
        "Seed of the global random generator. (default: 0)",
        "(default: on)",  # a --[no-]flag that is on
    ):
        assert expected in text, expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "abc"], "argument --port: invalid int value: 'abc'"),
        (["serve", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["generate", "--temperature", "hot"], "argument --temperature: invalid float value"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_flag_value_is_one_line_and_the_hint(argv: list[str], message: str) -> None:
    proc = run_twinfer(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    # argparse reports leftovers from the top-level parser, so that hint is `twinfer --help`.
    prog = "twinfer" if "unrecognized" in message else f"twinfer {argv[0]}"
    assert message in lines[0] and lines[0].startswith(f"{prog}: error:")
    assert lines[1] == f"Run '{prog} --help' for every flag."
    assert "usage:" not in proc.stderr
