"""Every command shown in README.md, docs/*.md and the scripts' docstrings (their --help) is accepted as
written, so the docs cannot drift from the code; and every link between the pages points to a file and a
heading that exist.

Which commands: the lines of the pages' fenced blocks (``` with no language, or bash/sh/shell), and of the
docstrings of the scripts (*.py, bench/*.py), that start, after any VAR=value prefixes, with `python`,
`make`, `accelerate launch`, `torchrun` or `lm_eval`; a line ending in a backslash continues on the next.
Everything else (output, the layout tree, `pip`, prose) is text.

How each is checked, without running anything:
- `python SCRIPT.py ARGS` (a script of this repository, bench/ included): the script's own `main(ARGS)` is
  called with argparse stopped right after it parsed its command line, so the options, choices and
  types are the script's own (the real parser, its real errors); no stage runs. evaluate.py passes the
  options it does not know to lm_eval: those are parsed by lm_eval's parser too.
- `accelerate launch ...` and `torchrun ...`: the launcher's own parser, then the script it starts, as above.
- `lm_eval ...`: lm_eval's own parser (as `lm_eval run ...`, its default command).
- `make TARGET`: TARGET is a rule of the Makefile.

The hub and the GPU: parsing needs neither, so the commands that would need them to run (the 8B presets
`code` and `math` without `--model DIR`, hub ids, `--device cuda`, `--backend vllm`, `lm_eval --model vllm`,
several GPUs) are checked like the rest; the rule is simply that no command is ever run here. A script's
checks after parsing (a recipe file read by --config, a folder that must exist) are not made: they need
the files a run produces.
"""

import argparse
import ast
import contextlib
import importlib
import re
import shlex
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks import their neighbours by plain name

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = [*sorted(ROOT.glob("*.py")), *sorted(ROOT.glob("bench/*.py"))]
PROGRAMS = {"python", "make", "accelerate", "torchrun", "lm_eval"}
SHELL_BLOCKS = {"", "bash", "sh", "shell"}


def commands_in(lines):
    """(line number, words) of each command among (line number, text) lines."""
    commands, pending, start = [], "", 0
    for number, line in lines:
        stripped = line.strip()
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = pending + stripped, ""
        line = re.sub(r"^([A-Z_]+=\S*\s+)+", "", line)  # HF_HUB_OFFLINE=1 python ...
        if line.split(" ", 1)[0] in PROGRAMS:
            commands.append((start, shlex.split(line, comments=True)))
    return commands


def fenced_commands(page):
    """The commands of the page's shell blocks."""
    lines, language = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            language = line.strip()[3:].strip() if language is None else None
        elif language in SHELL_BLOCKS:
            lines.append((number, line))
    return commands_in(lines)


def docstring_commands(script):
    """The commands of a script's docstring, which its --help shows."""
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    return commands_in(enumerate(docstring.splitlines(), 1))


COMMANDS = [
    pytest.param(words, id=f"{page.relative_to(ROOT)}:{number}")
    for page in PAGES
    for number, words in fenced_commands(page)
] + [
    pytest.param(words, id=f"{script.relative_to(ROOT)}:{number}")
    for script in SCRIPTS
    for number, words in docstring_commands(script)
]


class Parsed(Exception):
    """Raised by argparse, patched below, as soon as a script's command line is parsed."""

    def __init__(self, extra):
        self.extra = extra


@contextlib.contextmanager
def parse_then_stop():
    """Within this, argparse parses as it always does, then stops the script: its main goes no further."""
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def known(self, args=None, namespace=None):
        raise Parsed(parse_known_args(self, args, namespace)[1])

    def strict(self, args=None, namespace=None):  # ArgumentParser.parse_args, as argparse writes it
        extra = parse_known_args(self, args, namespace)[1]
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise Parsed([])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", known)
        patch.setattr(argparse.ArgumentParser, "parse_args", strict)
        yield


def lm_eval_run(args):
    """lm_eval's own parser on `lm_eval run ARGS` (an unknown option or a bad value exits 2)."""
    from lm_eval._cli import HarnessCLI

    HarnessCLI()._parser.parse_args(["run", *args])


def check_script(script, args):
    path = ROOT / script
    assert path.suffix == ".py" and path.is_file(), f"{script}: no such script in the repository"
    module = importlib.import_module(path.stem)
    with parse_then_stop():
        try:
            module.main(list(args))
        except Parsed as parsed:
            extra = parsed.extra
        except SystemExit as e:  # argparse's error (its message is in the captured stderr), or --help
            assert e.code == 0, f"{script} {shlex.join(args)}: rejected by its argument parser"
            return
        else:
            pytest.fail(f"{script}: main() returned without parsing a command line")
    if extra:  # only evaluate.py lets options through, to lm_eval
        assert path.stem == "evaluate", f"{script}: unrecognized {extra}"
        lm_eval_run(extra)


@pytest.mark.parametrize("words", COMMANDS)
def test_command_is_accepted(words):
    program, args = words[0], words[1:]
    if program == "make":
        rules = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        targets = {a for a in args if "=" not in a}  # make venv TORCH=torch: a variable, not a target
        assert targets <= rules, f"make {' '.join(args)}: not a rule of the Makefile"
    elif program == "lm_eval":
        lm_eval_run(args)
    elif program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert args[0] == "launch", words
        launched = launch_command_parser().parse_args(args[1:])
        check_script(launched.training_script, launched.training_script_args)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        launched = get_args_parser().parse_args(args)
        check_script(launched.training_script, launched.training_script_args)
    elif args[:1] != ["-m"]:  # python -m pytest ...: a module, not a script of this repository
        check_script(args[0], args[1:])


def test_readme_starts_with_the_two_commands():
    first = [words for _, words in fenced_commands(ROOT / "README.md")][:2]
    assert first == [["make", "demo"], ["make", "test"]]


def test_commands_were_found():
    """The extraction finds what the pages show: a change of format that hid the commands would fail here."""
    shown = [words for page in PAGES for _, words in fenced_commands(page)]
    scripts = {words[1] for words in shown if words[0] == "python"}
    assert {"compute_gram.py", "merge_model.py", "evaluate.py", "judge_merge.py", "demo.py"} <= scripts
    assert len(shown) >= 40 and {"accelerate", "torchrun", "lm_eval", "make"} <= {words[0] for words in shown}
    assert all(docstring_commands(ROOT / f"{stage}.py") for stage in ("compute_gram", "merge_model", "evaluate"))


def anchors(page):
    """The ids GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings, in_block = [], False
    for line in page.read_text().splitlines():
        in_block ^= line.strip().startswith("```")  # a comment in a code block is no heading
        if not in_block and re.match(r"#+\s", line):
            headings.append(line.lstrip("#"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_to_pages_and_headings_that_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}, no such file"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: link to {target}, no such heading"
