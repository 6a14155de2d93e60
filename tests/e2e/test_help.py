"""``--help`` of both services lists the SQUIRE_<FLAG> variable of every flag,
and each of those variables really sets its flag."""

from __future__ import annotations

import argparse
import re
import subprocess

import procs
import pytest

from orchestrator_service import __main__ as orchestrator_main
from worker_service import _cli as worker_cli


def long_flags(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    return [(next(o for o in a.option_strings if o.startswith("--")), a)
            for a in parser._actions if a.option_strings and a.dest != "help"]


def env_of(flag: str) -> str:
    return "SQUIRE_" + flag[2:].replace("-", "_").upper()


def sample(action: argparse.Action) -> str:
    """A value for ``action`` that differs from its default."""
    if isinstance(action, argparse._StoreTrueAction):
        return "1"
    if action.choices:
        values = [getattr(c, "value", c) for c in action.choices]
        return next(str(v) for v in values if str(v) != str(getattr(action.default, "value",
                                                                     action.default)))
    if action.type is not None or isinstance(action.default, int | float):
        return "7"
    return "/some/where"


@pytest.mark.parametrize("entry_point", ["squire-orchestrator", "squire-worker"])
def test_help_names_the_environment_variable_of_every_flag(entry_point: str) -> None:
    out = subprocess.run([procs.entry_point(entry_point), "--help"], capture_output=True,
                         text=True, timeout=60, check=True, env={"COLUMNS": "200"}).stdout
    parser = (orchestrator_main.build_parser() if entry_point == "squire-orchestrator"
              else worker_cli.build_parser({}))
    flags = long_flags(parser)
    assert len(flags) > 10
    # one block per flag: its line and the help lines indented under it
    blocks = re.split(r"\n(?=  -)", out)
    for flag, action in flags:
        block = next(b for b in blocks if re.match(rf"  (-\w, )?{flag}\b", b))
        assert f"[${env_of(flag)}]" in " ".join(block.split()), block
        # more than the default: --log-level's help was "(default INFO)" alone
        assert re.sub(r"\(default[^)]*\)", "", action.help or "").strip(), \
            f"{flag} has no help text"


def test_every_orchestrator_variable_sets_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = orchestrator_main.parse_args([])
    for flag, action in long_flags(orchestrator_main.build_parser()):
        with monkeypatch.context() as m:
            m.setenv(env_of(flag), sample(action))
            from_env = getattr(orchestrator_main.parse_args([]), action.dest)
            from_flag = getattr(orchestrator_main.parse_args(
                [flag] if action.nargs == 0 else [flag, sample(action)]), action.dest)
        assert from_env == from_flag != getattr(defaults, action.dest), flag


def test_every_worker_variable_sets_its_flag() -> None:
    parser = worker_cli.build_parser({})
    for flag, action in long_flags(parser):
        value = sample(action)
        from_env = getattr(worker_cli.build_parser({env_of(flag): value}).parse_args([]),
                           action.dest)
        from_flag = getattr(parser.parse_args([flag] if action.nargs == 0 else [flag, value]),
                            action.dest)
        if flag == "--ops":  # a list, appended to; SQUIRE_OPS is read after parsing
            assert worker_cli.parse_config([], {"SQUIRE_OPS": "m"}).ops == ("m",)
            continue
        assert from_env == from_flag != parser.get_default(action.dest), flag


def test_a_variable_that_is_not_a_number_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQUIRE_PORT=abc and the like: argparse's usage error (exit 2) naming the
    flag, never a ValueError while the parser is built (a default converted
    with int() or float() instead of by the flag's type)."""
    for flag, action in long_flags(orchestrator_main.build_parser()):
        if action.type is None or action.choices:
            continue
        with monkeypatch.context() as m:
            m.setenv(env_of(flag), "not-a-number")
            with pytest.raises(SystemExit) as info:
                orchestrator_main.parse_args([])
        assert info.value.code == 2, flag
    for flag, action in long_flags(worker_cli.build_parser({})):
        if action.type is None or action.choices or flag == "--ops":
            continue
        with pytest.raises(SystemExit) as info:
            worker_cli.parse_config(["--ops", "m"], {env_of(flag): "not-a-number"})
        assert info.value.code == 2, flag
