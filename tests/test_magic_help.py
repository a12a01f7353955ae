"""The magics' help: ``-h`` on every verb, the generated ``%ec2?``, and README's table kept in step
with the parser tree (remotemagic/magic_parsers.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from remotemagic import magic_parsers

from .conftest import run_ok

README = Path(__file__).resolve().parents[1] / "README.md"


# -- what the README table says, what the parsers accept -------------------------------------------
def readme_table(text: str) -> list[str]:
    """The first column of each row of README's "Every magic" table."""
    section = text.split("## Every magic", 1)[1].split("\n## ", 1)[0]
    cells = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells.append(re.split(r"(?<!\\)\|", line)[1].strip())
    return cells[1:]  # the header row


def readme_spec(text: str) -> dict[str, set[str]]:
    """Magic (``%ec2 use``, ``%ec2_store``) -> the option strings README's table names for it.

    In a row's first column, each code span that starts with a magic names it (``%%ec2 run``
    counts as ``%ec2 run``); a code span that does not (`` `-z` `` after `` `%ec2_store -d a` ``)
    belongs to the magic before it."""
    spec: dict[str, set[str]] = {}
    for cell in readme_table(text):
        magic = None
        for span in re.findall(r"`([^`]*)`", cell):
            words = span.split()
            if words and words[0] in ("%ec2", "%%ec2") and len(words) > 1:
                magic = f"%ec2 {words[1]}"
            elif words and words[0] == "%ec2_store":
                magic = "%ec2_store"
            if magic is None:
                continue
            spec.setdefault(magic, set()).update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", span))
    return spec


def parser_spec() -> dict[str, list[tuple[str, ...]]]:
    """Magic -> the option strings of each of its options (``-h`` left out)."""
    parsers = {f"%ec2 {verb}": p for verb, p in magic_parsers.VERBS.items()}
    parsers["%ec2_store"] = magic_parsers.STORE_PARSER
    return {magic: [tuple(a.option_strings) for a in p._actions
                    if a.option_strings and not isinstance(a, argparse._HelpAction)]
            for magic, p in parsers.items()}


def drift(readme: dict[str, set[str]], parsers: dict[str, list[tuple[str, ...]]]) -> list[str]:
    """Every difference between README's table and the parsers, one line each."""
    problems = [f"{m} is a magic verb but has no row in README's table" for m in parsers if m not in readme]
    problems += [f"README's table has {m}, which the parsers do not know" for m in readme if m not in parsers]
    for magic, options in parsers.items():
        named = readme.get(magic, set())
        known = {s for strings in options for s in strings}
        problems += [f"README names {magic} {o}, which its parser does not accept" for o in sorted(named - known)]
        if magic in readme:
            problems += [f"{magic} {'/'.join(strings)} is not in README's table" for strings in options
                         if not named & set(strings)]
    return problems


def test_readme_table_matches_the_parsers() -> None:
    problems = drift(readme_spec(README.read_text(encoding="utf-8")), parser_spec())
    assert not problems, "README's table of magics and remotemagic/magic_parsers.py differ:\n" + "\n".join(problems)


def test_drift_check_names_each_difference() -> None:
    table = """## Every magic

| magic | what it does |
|---|---|
| `%ec2 jobs [-n N]` / `%ec2 frob` | ... |
| `%%ec2 run [-i a,b] [--bogus]` | ... `--ignored` in the description |
| `%ec2_store -d a` / `-q` | ... |

## Next
"""
    parsers = {"%ec2 jobs": [("-n",)], "%ec2 run": [("-i", "--push"), ("-o", "--pull")],
               "%ec2 wait": [("--timeout",)], "%ec2_store": [("-d",)]}
    assert sorted(drift(readme_spec(table), parsers)) == sorted([
        "%ec2 wait is a magic verb but has no row in README's table",
        "README's table has %ec2 frob, which the parsers do not know",
        "README names %ec2 run --bogus, which its parser does not accept",
        "%ec2 run -o/--pull is not in README's table",
        "README names %ec2_store -q, which its parser does not accept",
    ])


# -- -h everywhere ----------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", list(magic_parsers.VERBS))
def test_every_verb_answers_help(fresh_shell: Any, verb: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    flag = tmp_path / "ran"
    parser = magic_parsers.VERBS[verb]
    cells = [f"%ec2 {verb} -h", f"%ec2 {verb} --help"]
    if verb in magic_parsers.CELL_VERBS:
        cells = [f"%%ec2 {verb} -h\nimport pathlib\npathlib.Path({str(flag)!r}).touch()",
                 f"%%ec2 {verb} --help\npass", f"%ec2 {verb} -h"]
    for cell in cells:
        capsys.readouterr()
        run_ok(fresh_shell, cell)
        out = capsys.readouterr().out
        assert out == parser.format_help(), (cell, out)
        assert f"usage: {parser.prog}" in out
        for strings in parser_spec()[f"%ec2 {verb}"]:
            assert all(s in out for s in strings), (cell, strings)
    assert not flag.exists()  # the cell's code did not run
    assert "no %ec2 use" not in capsys.readouterr().err  # nor was a target connected


def test_ec2_help_lists_the_verbs(fresh_shell: Any, capsys: pytest.CaptureFixture) -> None:
    for line in ("-h", "--help"):
        run_ok(fresh_shell, f"%ec2 {line}")
        out = capsys.readouterr().out
        assert out.startswith("usage: %ec2 ")
        for verb, parser in magic_parsers.VERBS.items():
            assert re.search(rf"^    {verb} +\S", out, re.M), verb  # each verb with its summary
            assert parser.description.split(".")[0].lower() in out.lower(), verb


def test_store_answers_help(fresh_shell: Any, capsys: pytest.CaptureFixture) -> None:
    fresh_shell.user_ns["a"] = 1
    run_ok(fresh_shell, "%ec2_store -h a")
    out = capsys.readouterr().out
    assert out == magic_parsers.STORE_PARSER.format_help() and "usage: %ec2_store" in out
    assert "--remote" in out and "%ec2_store -r --remote a" in out  # the options and the examples


def test_docstrings_are_generated_from_the_parsers(fresh_shell: Any) -> None:
    ec2 = fresh_shell.find_magic("ec2")
    assert ec2.__doc__ == magic_parsers.ec2_doc()
    for parser in magic_parsers.VERBS.values():
        assert parser.format_help().rstrip() in ec2.__doc__
    assert ec2.__doc__.startswith("usage: %ec2 ") and "Run code on a bigger machine" in ec2.__doc__
    assert fresh_shell.find_magic("ec2_store").__doc__ == magic_parsers.STORE_PARSER.format_help()
    # what %ec2? shows
    shown = fresh_shell.object_inspect_text("%ec2")
    assert "usage: %%ec2 run" in shown and "usage: %ec2 use" in shown and "--trust-new-host" in shown


# -- errors keep naming the verb ----------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("%ec2 jobs --nope", ["%ec2 jobs: unrecognized arguments: --nope", "usage: %ec2 jobs [-h] [-n N]"]),
    ("%ec2 use nowhere", ["%ec2 use: argument kind: invalid choice: 'nowhere'", "usage: %ec2 use"]),
    ("%ec2 frobnicate", ["unknown command %ec2 frobnicate: the verbs are use, start,", "sync (%ec2 -h says"]),
    ("%ec2", ["usage: %ec2 [-h] VERB", "    run "]),
    ("%ec2 run -i x", ["%ec2 run is a cell magic: start the cell with %%ec2 run"]),
    ("%%ec2 jobs\npass", ["%%ec2 jobs is not a cell command"]),
    ("%ec2_store --nope", ["%ec2_store: unrecognized arguments: --nope", "usage: %ec2_store"]),
])
def test_errors_name_the_magic_and_show_its_usage(fresh_shell: Any, line: str, expected: list[str]) -> None:
    result = fresh_shell.run_cell(line)
    err = result.error_in_exec
    assert isinstance(err, UsageError), err
    for text in expected:
        assert text in str(err), (line, text, str(err))


def test_use_takes_its_kinds_from_one_constant() -> None:
    (kind,) = [a for a in magic_parsers.VERBS["use"]._actions if a.dest == "kind"]
    assert tuple(kind.choices) == magic_parsers.TARGET_KINDS
    assert magic_parsers.parse_ec2("use local --session s1", is_cell=False) == magic_parsers.Command(
        "use", argparse.Namespace(kind="local", host=None, root=None, session="s1", python=None, workdir=None,
                                  ssh_config=None, trust_new_host=False))


def test_parsed_values_keep_their_old_shape() -> None:
    run = magic_parsers.parse_ec2("run -i a,ℌ --bg --timeout 2.5", is_cell=True)
    assert run is not None and run.args.push == ["a", "H"] and run.args.pull == [] and run.args.timeout == 2.5
    pip = magic_parsers.parse_ec2("pip install -U 'numpy<3' pandas", is_cell=False)
    assert pip is not None and pip.args.words == ["install", "-U", "numpy<3", "pandas"]
    jobs = magic_parsers.parse_ec2("jobs", is_cell=False)
    assert jobs is not None and jobs.args.n == 20


def test_a_repeated_cell_line_parses_alike_each_time(capsys: pytest.CaptureFixture) -> None:
    """%%ec2 run lines are parsed once (see parse_ec2); each cell still gets its own arguments,
    help is printed every time and a bad line fails every time."""
    line = "run -i a,b -o c --timeout 3"
    seen = []
    for _ in range(3):  # parsed, then twice from what was kept: no cell sees another's changes
        command = magic_parsers.parse_ec2(line, is_cell=True)
        assert command is not None and command.verb == "run"
        assert all(command.args is not earlier.args for earlier in seen)
        assert (command.args.push, command.args.pull, command.args.timeout) == (["a", "b"], ["c"], 3.0)
        command.args.push.append("z")
        command.args.timeout = 99
        seen.append(command)
    for _ in range(2):
        assert magic_parsers.parse_ec2("run -h", is_cell=True) is None
        assert capsys.readouterr().out == magic_parsers.VERBS["run"].format_help()
        with pytest.raises(UsageError, match="'1x' is not a variable name"):
            magic_parsers.parse_ec2("run -i 1x", is_cell=True)
        with pytest.raises(UsageError, match="is a cell magic"):
            magic_parsers.parse_ec2("run -i a,b -o c --timeout 3", is_cell=False)
