"""The README and the guides in docs/ stay true to the code and to each other.

- Every ``gptflow ...`` command they show (in shell code blocks, indented code blocks and inline
  code spans) parses with the command line's own parser, and its ``--set`` and ``--grid`` settings
  are checked as the command checks them before it runs: renaming a flag, a subcommand or a setting
  fails here, naming the file, the line and the command.
- Every relative link points to a file that exists, and a link to a heading (``guide.md#heading``)
  to a heading that file has.
- The README stays a first-visit page: at most ``README_MAX_LINES`` lines; the details live in docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from gptflow.flows.cli import build_parser
from gptflow.tasks.settings import (
    ConfigError,
    EvaluateSettings,
    FinetuneSettings,
    PretrainSettings,
    build_config,
    parse_override_pairs,
)
from gptflow.tasks.sweep_plan import check_points, check_scaling, parse_grid, plan_points

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)")
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
PIPELINE_OPERATORS = {"|", "||", "&&", ";", "&"}
ENVIRONMENT_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>\n`]+>")
UPPERCASE_METAVAR = re.compile(r"^[A-Z][A-Z0-9_]*(:[A-Z][A-Z0-9_]*)?$")
ELLIPSES = {"...", "…"}


@dataclass(frozen=True)
class Command:
    """One ``gptflow`` command of a document: ``argv`` is what follows ``gptflow``."""

    path: Path
    line: int
    text: str
    argv: tuple[str, ...]
    inline: bool
    """An inline code span in prose: it may leave out required flags and values (``gptflow
    evaluate --classification``) or elide the rest (``gptflow --debug ...``); the subcommand and
    every flag it names must still exist."""

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def is_placeholder(token: str) -> bool:
    """``$VAR``, ``${VAR}``, ``<run id>``, ``.gptflow/store/runs/<key>/final`` or a metavar such as
    ``N`` or ``HOST:PORT``: a value the reader fills in, taken as it is."""
    return "$" in token or bool(ANGLE_PLACEHOLDER.search(token)) or bool(UPPERCASE_METAVAR.match(token))


def _shell_words(text: str) -> list[str] | None:
    """``text`` split as the shell splits it (comments dropped), ``<a b>`` placeholders kept whole;
    None when it does not split (an unclosed quote)."""
    text = ANGLE_PLACEHOLDER.sub(lambda match: match[0].replace(" ", "_"), text)
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return None


def _gptflow_commands(text: str) -> list[list[str]]:
    """The ``gptflow`` commands of one shell command line: each part of a pipeline or list
    (``echo x | gptflow generate ...``, ``a && gptflow sync``) whose command is ``gptflow``,
    after any ``NAME=value`` environment assignments."""
    words = _shell_words(text)
    if not words:
        return []
    parts: list[list[str]] = [[]]
    for word in words:
        if word in PIPELINE_OPERATORS:
            parts.append([])
        else:
            parts[-1].append(word)
    commands = []
    for part in parts:
        while part and ENVIRONMENT_ASSIGNMENT.match(part[0]):
            part = part[1:]
        if part[:1] == ["$"]:  # a console prompt
            part = part[1:]
        if len(part) >= 2 and part[0] == "gptflow" and re.match(r"[a-z-]", part[1]):
            commands.append(part[1:])
    return commands


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with their ``\\`` continuations joined, each with the number of its first line."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
        else:
            pending = None
            joined.append((number, line))
    if pending is not None:
        joined.append(pending)
    return joined


def extract_commands(path: Path, text: str | None = None) -> list[Command]:
    """Every ``gptflow`` command in a Markdown document: in fenced shell blocks, in indented code
    blocks and in inline code spans of the prose."""
    text = path.read_text(encoding="utf-8") if text is None else text
    lines = text.splitlines()
    commands: list[Command] = []
    prose = list(lines)  # the document with code blocks blanked, for the inline spans
    block: list[tuple[int, str]] | None = None
    fence = language = ""
    indented: list[tuple[int, str]] = []

    def add_block(block_lines: list[tuple[int, str]]) -> None:
        for number, line in _logical_lines(block_lines):
            for argv in _gptflow_commands(line):
                commands.append(Command(path, number, " ".join(line.split()), tuple(argv), inline=False))

    previous_blank = True
    for index, line in enumerate(lines):
        number = index + 1
        if block is not None:
            prose[index] = ""
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                if language in SHELL_LANGUAGES:
                    add_block(block)
                block = None
            else:
                block.append((number, line))
            continue
        opened = FENCE.match(line)
        if opened:
            prose[index] = ""
            block, fence, language = [], opened["fence"], opened["language"].lower()
            continue
        # An indented code block: a run of lines indented by 4 spaces or more after a blank line
        # (in a list item, 4 or more beyond the item's text).
        if (previous_blank or indented) and _is_indented_code(lines, index):
            indented.append((number, line.strip()))
            prose[index] = ""
            continue
        if indented:
            add_block(indented)
            indented = []
        previous_blank = not line.strip()
    if indented:
        add_block(indented)

    prose_text = "\n".join(prose)
    for match in INLINE_CODE.finditer(prose_text):
        span = " ".join(match[2].split())
        if not span.startswith("gptflow "):
            continue
        number = prose_text.count("\n", 0, match.start()) + 1
        for argv in _gptflow_commands(span):
            commands.append(Command(path, number, span, tuple(argv), inline=True))
    return commands


def _is_indented_code(lines: list[str], index: int) -> bool:
    """Whether line ``index`` (after a blank line) is indented code: by 4 spaces or more beyond the
    text of the list item it continues, if any (CommonMark's rule)."""
    line = lines[index]
    indent = len(line) - len(line.lstrip())
    if not line.strip() or indent < 4:
        return False
    for above in reversed(lines[:index]):
        above_indent = len(above) - len(above.lstrip())
        if not above.strip() or above_indent >= indent:
            continue
        item = re.match(r"(\s*([-*+]|\d+[.)])\s+)\S", above)
        if item:
            return indent >= len(item[1]) + 4
        if above_indent == 0:
            return True
    return True


class _PlaceholderChoices(list):
    """An argument's choices, taking a placeholder too (``--preset $PRESET``)."""

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and is_placeholder(value)) or super().__contains__(value)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _docs_parser(inline: bool) -> argparse.ArgumentParser:
    """``build_parser()`` as the documents are checked with it: no abbreviated flags (a renamed flag
    must not still match an old name that is a prefix of the new one), placeholders accepted as any
    value; for inline spans, no argument required."""
    parser = build_parser()
    for each in (parser, *_subcommands(parser).values()):
        each.allow_abbrev = False
        for action in each._actions:
            if action.type is not None and callable(action.type):
                action.type = _accepting_placeholders(action.type)
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                action.choices = _PlaceholderChoices(action.choices)
            if inline:
                action.required = False
    return parser


def _accepting_placeholders(convert):
    def converted(value: str):
        return value if is_placeholder(value) else convert(value)

    converted.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return converted


def _complete_inline(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """An inline span's words with the rest after an ellipsis left out, and a placeholder value
    after each flag that takes one but is written without it (``--classification``)."""
    if any(word in ELLIPSES for word in argv):
        argv = argv[: next(index for index, word in enumerate(argv) if word in ELLIPSES)]
    # Usage notation: `gptflow sync [--workspace DIR]`.
    argv = [word.removeprefix("[").removesuffix("]") if re.fullmatch(r"\[?-{1,2}\w[\w-]*|\S+\]", word) else word
            for word in argv]
    actions = dict(parser._option_string_actions)
    for word in argv:
        if word in _subcommands(parser):
            actions.update(_subcommands(parser)[word]._option_string_actions)
            break
    completed: list[str] = []
    for index, word in enumerate(argv):
        completed.append(word)
        action = actions.get(word)
        takes_value = action is not None and action.nargs not in (0, "?", "*")
        following = argv[index + 1] if index + 1 < len(argv) else None
        if takes_value and (following is None or following.startswith("-")):
            completed.append("<value>")
    return completed


def parse_command(command: Command) -> argparse.Namespace:
    """``command`` parsed by gptflow's parser; a failure is an AssertionError naming the file, the
    line, the command and argparse's message."""
    parser = _docs_parser(command.inline)
    argv = _complete_inline(parser, list(command.argv)) if command.inline else list(command.argv)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            return argparse.Namespace(command=None)
        message = stderr.getvalue().strip().splitlines()
        reason = message[-1] if message else f"exit status {exit_.code}"
        raise AssertionError(f"{command.where()}\n    gptflow refuses it: {reason}") from None


def check_settings(command: Command, args: argparse.Namespace) -> None:
    """The ``--set`` and ``--grid`` settings of a ``pretrain``, ``sweep``, ``finetune`` or
    ``evaluate`` command checked as the command checks them before it runs (keys, and values that
    are not placeholders); config files are not read."""
    pairs = [pair for pair in getattr(args, "overrides", None) or [] if not is_placeholder(pair.partition("=")[2])]
    try:
        overrides = parse_override_pairs(pairs)
        if args.command == "pretrain":
            build_config(PretrainSettings, None if is_placeholder(args.preset) else args.preset, None, overrides)
        elif args.command == "sweep" and command.inline and not args.grid:  # `gptflow sweep` named in prose
            build_config(PretrainSettings, None if is_placeholder(args.preset) else args.preset, None, overrides)
        elif args.command == "sweep":
            grid = parse_grid([pair for pair in args.grid if not is_placeholder(pair)])
            points = plan_points(grid, args.random_points, args.seed)
            configs = check_points(points, args.preset, None, overrides)
            if args.scaling and not command.inline:
                check_scaling(points, configs)
        elif args.command == "finetune":
            build_config(FinetuneSettings, None, None, overrides)
        elif args.command == "evaluate":
            build_config(EvaluateSettings, overrides=overrides)
    except ConfigError as error:
        raise AssertionError(f"{command.where()}\n    gptflow refuses its settings: {error}") from None


def _relative_links(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    prose = _without_code(text)
    links = []
    for match in LINK.finditer(prose):
        target = match[1] or match[2]
        links.append((prose.count("\n", 0, match.start()) + 1, target))
    for match in REFERENCE_LINK.finditer(prose):
        links.append((prose.count("\n", 0, match.start()) + 1, match[1]))
    return [(line, target) for line, target in links if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)]


def _without_fences(text: str) -> str:
    """``text`` with its fenced code blocks blanked (their line breaks kept)."""
    lines, fence = [], ""
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = ""
            lines.append("")
        elif opened:
            fence = opened["fence"]
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code blanked (their line breaks kept)."""
    return INLINE_CODE.sub(lambda match: "\n" * match[0].count("\n"), _without_fences(text))


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them: lower case, punctuation
    dropped, spaces as hyphens, ``-1``, ``-2``, ... after repeats."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _without_fences(path.read_text(encoding="utf-8")),
                              re.MULTILINE):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        repeats[slug] = repeats.get(slug, -1) + 1
        found.add(slug if repeats[slug] == 0 else f"{slug}-{repeats[slug]}")
    return found


def broken_links(document: Path) -> list[str]:
    """``file:line: target (why)`` for each relative link of ``document`` to a file that does not
    exist, or to a heading its Markdown file lacks."""
    broken = []
    for line, target in _relative_links(document):
        file, _, fragment = unquote(target).partition("#")
        linked = document.parent / file if file else document
        where = f"{document.relative_to(ROOT) if document.is_relative_to(ROOT) else document.name}:{line}: {target}"
        if not linked.exists():
            broken.append(f"{where} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{where} (no such heading in {file or 'this file'})")
    return broken


# --- the documents ---------------------------------------------------------------------------


def test_the_readme_is_a_first_visit_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} (what a first visit needs) and "
        "move the details to a guide in docs/")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_gptflow_command_in_the_documents_parses(document):
    failures = []
    for command in extract_commands(document):
        try:
            check_settings(command, parse_command(command))
        except AssertionError as failure:
            failures.append(str(failure))
    assert not failures, f"{len(failures)} command(s) gptflow does not take as written:\n" + "\n".join(failures)


def test_the_readme_and_the_guides_show_commands_to_check():
    """The extraction finds the commands: a README or guide whose commands all slipped past it would
    pass the test above for nothing."""
    counts = {path.name: sum(not command.inline for command in extract_commands(path)) for path in DOCUMENTS}
    assert counts.pop("README.md") >= 10, counts
    assert sum(counts.values()) >= 30, counts


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading(document):
    broken = broken_links(document)
    assert not broken, "links to files or headings that do not exist:\n" + "\n".join(broken)


def test_the_readme_links_every_guide():
    linked = {target.split("#", 1)[0] for _, target in _relative_links(README)}
    guides = {f"docs/{path.name}" for path in DOCUMENTS if path.parent.name == "docs"}
    assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"


# --- the extraction and the check themselves --------------------------------------------------

SAMPLE = '''\
Intro with `gptflow sync` inline, `gptflow evaluate --classification` as a pointer, and
an experiment named `gptflow (copied from …)`, which is no command.

```bash
gptflow pretrain --corpus ./texts \\
    --preset tiny     # a comment
echo "import json" | gptflow generate --model .gptflow/store/runs/<key>/final --top-k 20
export GPTFLOW_HOME=$PWD/.gptflow && gptflow sync --workspace "$GPTFLOW_HOME"
mlflow ui --backend-store-uri sqlite:////tmp/mlflow.db
```

```python
print("gptflow pretrain --no-such-flag")
```

- a list item

      gptflow presets --gpus 4

Text.

    gptflow evaluate --model "runs:/<run id>/model" --split all
'''


def test_commands_are_found_in_blocks_pipelines_lists_and_inline_spans():
    commands = extract_commands(ROOT / "sample.md", SAMPLE)
    found = [(command.line, command.argv, command.inline) for command in commands]
    assert found == [
        (5, ("pretrain", "--corpus", "./texts", "--preset", "tiny"), False),
        (7, ("generate", "--model", ".gptflow/store/runs/<key>/final", "--top-k", "20"), False),
        (8, ("sync", "--workspace", "$GPTFLOW_HOME"), False),
        (18, ("presets", "--gpus", "4"), False),
        (22, ("evaluate", "--model", "runs:/<run_id>/model", "--split", "all"), False),
        (1, ("sync",), True),
        (1, ("evaluate", "--classification"), True),
    ]
    for command in commands:
        parse_command(command)


@pytest.mark.parametrize("written", [
    "gptflow pretrain --corpuss ./texts",             # a misspelt flag
    "gptflow pretrain --corp ./texts",                # an abbreviation of a flag
    "gptflow pretrian --corpus ./texts",              # a misspelt subcommand
    "gptflow pretrain --preset huge",                 # a choice it does not have
    "gptflow generate --prompt hi",                   # a required flag left out of a code block
    "gptflow generate --model m --top-k many",        # a value of the wrong type
])
def test_a_command_gptflow_does_not_take_fails_naming_file_line_and_command(written):
    (command,) = extract_commands(ROOT / "guide.md", f"Text.\n\n```bash\n{written}\n```\n")
    with pytest.raises(AssertionError, match=rf"^guide\.md:4: {re.escape(written)}\n    gptflow refuses it: "):
        parse_command(command)


@pytest.mark.parametrize("written", [
    "gptflow pretrain --set train.learning_rat=1e-3",
    "gptflow pretrain --set train.max_steps=many",
    "gptflow finetune --set model.n_layer=2",
    "gptflow sweep --grid train.no_such=1,2",
])
def test_a_setting_gptflow_does_not_take_fails(written):
    (command,) = extract_commands(ROOT / "guide.md", f"```bash\n{written}\n```\n")
    with pytest.raises(AssertionError, match="gptflow refuses its settings"):
        check_settings(command, parse_command(command))


def test_an_inline_span_may_leave_out_values_but_not_name_a_flag_gptflow_lacks():
    text = "See `gptflow evaluate --classification` and `gptflow --debug ...`, not `gptflow evaluate --classify`.\n"
    commands = extract_commands(ROOT / "guide.md", text)
    parse_command(commands[0])
    parse_command(commands[1])
    with pytest.raises(AssertionError, match="unrecognized arguments: --classify"):
        parse_command(commands[2])


def test_a_link_to_a_missing_file_or_heading_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# A guide\n\n## The `--corpus` flag: files\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#the---corpus-flag-files) [ok](#top) [web](https://example.com/x)\n"
        "[gone](docs/gone.md) and [no heading](docs/guide.md#the-corpus)\n"
        "`[in code](docs/none.md)`\n\n# Top\n")
    assert broken_links(readme) == [
        "README.md:2: docs/gone.md (no such file)",
        "README.md:2: docs/guide.md#the-corpus (no such heading in docs/guide.md)",
    ]
