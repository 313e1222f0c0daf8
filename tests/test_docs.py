"""The documentation stays true to the tree and the CLI: every relative link in README.md and
docs/*.md points at a file that exists (and an #anchor at a heading of it), every repository path
named in backticks exists, and every `aaclip ...` command shown in a ```bash block names real
subcommands and real options of them. No subprocesses: the CLI is read from the Typer app."""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\S*)\s*$")


def _blocks(text: str, lang: str | None = None) -> list[str]:
    """The bodies of fenced code blocks (of one language, or all)."""
    out, body, inside = [], [], None
    for line in text.splitlines():
        fence = _FENCE.match(line.strip())
        if fence and inside is None:
            inside, body = fence.group(1), []
        elif line.strip() == "```" and inside is not None:
            if lang is None or inside == lang:
                out.append("\n".join(body))
            inside = None
        elif inside is not None:
            body.append(line)
    return out


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links and headings live in the prose)."""
    keep, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()) or (inside and line.strip() == "```"):
            inside = not inside
            continue
        if not inside:
            keep.append(line)
    return "\n".join(keep)


# ------------------------------------------------------------------------------------------- links

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", _prose(page.read_text()), re.M)}


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.name}: {broken}"


_REPO_PATH = re.compile(r"`((?:aaclip_core|aaclip_cli|benchmarks|tests|recipes|docs|scorer)/[\w./-]*)`")
_MODULE = re.compile(r"`((?:aaclip_core|aaclip_score)(?:\.\w+)+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_named_exists(page):
    """Module paths in backticks (`aaclip_core/recipe.py`, `aaclip_core.deploy.scorer`) exist, so a
    module that moves cannot leave the docs behind."""
    text = page.read_text()
    missing = []
    for path in _REPO_PATH.findall(text):
        if path == "aaclip_core/recipes":  # package data, installed from recipes/
            continue
        if "*" not in path and not (ROOT / path).exists():
            missing.append(path)
    for dotted in _MODULE.findall(text):
        parts = dotted.split(".")
        # a module, a package, or a name inside a module (aaclip_core.model.blocks.block_forward)
        base = ROOT / "scorer" if parts[0] == "aaclip_score" else ROOT  # the scorer's package lives in scorer/
        candidates = [base.joinpath(*parts[:n]) for n in range(len(parts), 1, -1)]
        if not any(c.with_suffix(".py").exists() or (c / "__init__.py").exists() for c in candidates):
            missing.append(dotted)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_the_images_in_docs_are_shown_and_the_test_command_is_in_the_readme():
    shown = {Path(link).name for page in PAGES for link in _links(page)}
    assert {p.name for p in (ROOT / "docs").glob("*.png")} <= shown
    # .ci/run runs the README's test command; keep them the same.
    readme_bash = _blocks((ROOT / "README.md").read_text(), "bash")
    assert '.venv/bin/python -m pytest -m "not slow and not integration" -q' in readme_bash
    assert '.venv/bin/python -m pytest -m "not slow and not integration" -q' in (ROOT / ".ci" / "run").read_text()


# ---------------------------------------------------------------------------------------- commands

@lru_cache(maxsize=1)
def _cli():
    from aaclip_cli.main import app

    return typer.main.get_command(app)


def _options(command) -> set[str]:
    names = {"-h", "--help"}
    for param in command.params:
        names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
    return names


def _segments(line: str) -> list[list[str]]:
    """Shell words of one logical line, split into simple commands at | ; && || ( ) and with the
    comment dropped; a quoted word holding a command line (bash -c '...') is split in its turn."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for word in lexer:
        if word and set(word) <= set("|;&()<>"):
            segments.append(current)
            current = [] if word not in (">", "<", ">>") else ["__redirect__"]
            continue
        if current == ["__redirect__"]:  # the file after > is not part of any command
            current = []
            continue
        if " " in word:  # bash -c '...': a command line of its own
            for line_inside in word.splitlines():
                segments += _segments(line_inside)
            continue
        current.append(word)
    segments.append(current)
    return [s for s in segments if s and s != ["__redirect__"]]


def check_aaclip_command(words: list[str]) -> list[str]:
    """What is wrong with one `aaclip ...` command (words after `aaclip`): unknown subcommands and
    options the resolved command does not take. Placeholders are fine: `[--opt]` brackets are
    dropped, and words that are not options are arguments or values, which are not checked."""
    problems = []
    words = [w.strip("[]") for w in words]
    words = [w for w in words if w and w not in ("...", "…")]
    command, path = _cli(), ["aaclip"]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words.pop(0)
        if name not in command.commands:
            return [f"'{' '.join(path)}' has no subcommand '{name}' (it has: {', '.join(sorted(command.commands))})"]
        command, path = command.commands[name], [*path, name]
    options = _options(command)
    for word in words:
        if word == "--":
            break
        if not word.startswith("-") or re.fullmatch(r"-\d[\d.e-]*", word):
            continue  # an argument, a value or a negative number
        option = word.split("=", 1)[0]
        if option not in options:
            problems.append(f"'{' '.join(path)}' has no option '{option}'")
    return problems


def aaclip_commands(block: str) -> list[list[str]]:
    """Every `aaclip ...` command of a bash block, as the words after `aaclip` (`.venv/bin/aaclip`
    and `torchrun ... -- aaclip ...` included)."""
    found = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        for words in _segments(line):
            for i, word in enumerate(words):
                if word == "aaclip" or word.endswith("/aaclip"):
                    found.append(words[i + 1:])
                    break
    return found


def _shown_commands():
    for page in PAGES:
        for block in _blocks(page.read_text(), "bash"):
            for words in aaclip_commands(block):
                yield page.name, words


def test_the_docs_show_commands_to_check():
    pages = {name for name, _ in _shown_commands()}
    assert len(list(_shown_commands())) >= 40 and {"README.md", "deploy.md", "distributed.md"} <= pages


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_aaclip_command_shown_parses_against_the_cli(page):
    problems = [
        f"aaclip {' '.join(words)}: {problem}"
        for block in _blocks(page.read_text(), "bash")
        for words in aaclip_commands(block)
        for problem in check_aaclip_command(words)
    ]
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_the_command_checker_catches_a_misspelt_option_and_an_unknown_subcommand():
    block = """
aaclip train feedback --loops 5 --recipe feedback-demo --sett x=1   # misspelt --set
aaclip train boost --recipe demo
aaclip test --run RUN_ID --visualise 4 | aaclip runs --json
RUN=$(aaclip train base --recipe demo --quite)
torchrun --nproc_per_node 8 --no-python -- aaclip test --runn RUN_ID
"""
    problems = [p for words in aaclip_commands(block) for p in check_aaclip_command(words)]
    assert problems == [
        "'aaclip train feedback' has no option '--sett'",
        "'aaclip train' has no subcommand 'boost' (it has: base, cross, feedback)",
        "'aaclip test' has no option '--visualise'",
        "'aaclip train base' has no option '--quite'",
        "'aaclip test' has no option '--runn'",
    ]


def test_the_command_checker_reads_placeholders_comments_and_continuations():
    block = r"""
aaclip runs           [--stage base] [--limit N] [--json]      # list runs; --mark-dead ID
aaclip data synth DIR | aaclip data index ROOT                # demo data
aaclip train base --set data.train.root=/data/VisA --set shot=32 \
    --set text_lr=1e-5 --seed=-1
srun bash -c 'torchrun --nnodes $SLURM_NNODES \
    --no-python -- aaclip train base --recipe base --tracking-uri http://mlflow:5000'
aaclip compare > report.txt
.venv/bin/aaclip -h
"""
    commands = aaclip_commands(block)
    assert [w[:2] for w in commands] == [
        ["runs", "[--stage"], ["data", "synth"], ["data", "index"], ["train", "base"], ["train", "base"], ["compare"],
        ["-h"],
    ]
    assert [p for words in commands for p in check_aaclip_command(words)] == []
