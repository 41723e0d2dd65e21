"""The docs stay true: every `vla-peft` command they show parses against the real CLI (subcommand,
flags and `section.key=value` overrides), every repository path they name exists, and every
relative link (and its #anchor) resolves. Nothing is run; only parsed and looked up."""

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from vla_peft.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REQUIRED_PAGES = ["README", "getting-started", "peft-methods", "training", "data", "environments", "evaluation",
                  "bundles", "serving", "base-models", "benchmarks", "results", "promises", "architecture"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# a repository path: starts at one of the top-level folders, not inside a longer path (runs/bench/x is output)
REPO_PATH = re.compile(r"(?<![\w/.\-~$])((?:configs|vla_peft|bench|tests|envs|docs|\.ci)/[\w./\-]*)")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def code_lines(text: str):
    """(line, whole) for the logical lines of fenced blocks (continuations and multi-line quotes joined; whole
    commands) and for inline spans (often a mention such as `vla-peft train` or `vla-peft eval --bank`)."""
    for block in FENCE.findall(text):
        buffer = ""
        for line in block.splitlines():
            buffer = f"{buffer} {line.strip()}" if buffer else line.strip()
            if buffer.endswith("\\"):
                buffer = buffer[:-1]
                continue
            if is_command(buffer):
                try:
                    shlex.split(buffer, comments=True)
                except ValueError:  # an open quote: the argument goes on on the next line
                    continue
            yield buffer, True
            buffer = ""
    for span in INLINE.findall(FENCE.sub("", text)):
        yield span, False


def is_command(line: str) -> bool:
    return "vla-peft " in line or "vla_peft.cli" in line


def shell_commands(line: str) -> list[list[str]]:
    """The words of each command in a shell line (split at &&, ;, |); comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def documented_commands():
    """(page, argv, whole) for each `vla-peft ...`, `python -m vla_peft.cli ...` or `torchrun ... -m vla_peft.cli ...`."""
    found = []
    for page in PAGES:
        for line, whole in code_lines(page.read_text()):
            if not is_command(line):
                continue
            for words in shell_commands(line.removeprefix("$ ")):
                if words[:1] == ["vla-peft"]:
                    found.append((rel(page), words[1:], whole))
                elif "vla_peft.cli" in words and words[words.index("vla_peft.cli") - 1] == "-m":
                    found.append((rel(page), words[words.index("vla_peft.cli") + 1:], whole))
    return found


def override_fields() -> dict[str, set[str]]:
    """The keys `section.key=value` may name, from the dataclasses that receive them."""
    from vla_peft.data.dataset import DataConfig
    from vla_peft.demo import COLLECT_KEYS, PLAY_KEYS
    from vla_peft.eval.evaluate import EvalConfig
    from vla_peft.peft.adapter import AdapterConfig
    from vla_peft.peft.lora import LoraConfig
    from vla_peft.peft.prefix import PrefixConfig, PromptConfig
    from vla_peft.policy.config import PolicyConfig
    from vla_peft.train.config import TrainConfig

    names = lambda *classes: {f.name for cls in classes for f in dataclasses.fields(cls)}  # noqa: E731
    return {"policy": names(PolicyConfig), "train": names(TrainConfig), "data": names(DataConfig),
            "method": names(LoraConfig, AdapterConfig, PrefixConfig, PromptConfig), "eval": names(EvalConfig),
            "collect": set(COLLECT_KEYS) | set(PLAY_KEYS)}


def check_command(argv: list[str], whole: bool, fields: dict[str, set[str]]) -> str | None:
    """None if the command is right, else what is wrong. A whole command must parse as given; a mention in
    prose (`vla-peft eval --bank`) must name a real subcommand and real flags. Overrides must name real keys."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv and not whole:
        return None  # the entry point itself, named in prose
    if not argv or argv[0] not in commands:
        return f"no subcommand {argv[:1]}; the CLI has {sorted(commands)}"
    err, args = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code != 0 and whole:
            return err.getvalue().strip().splitlines()[-1]
    if args is not None:
        overrides = getattr(args, "overrides", None) or []
    else:  # a fragment in prose
        known = commands[argv[0]]._option_string_actions
        flags = [w.partition("=")[0] for w in argv[1:] if w.startswith("--")]
        if unknown := [f for f in flags if f not in known]:
            return f"vla-peft {argv[0]} has no option {unknown}"
        overrides = [w for w in argv[1:] if "=" in w and not w.startswith("-")] if argv[0] in ("train", "demo") else []
    for pair in overrides:
        key, _, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not dot:
            if key == "method" and argv[0] == "train" and (value == "none" or (REPO / value).is_file()):
                continue
            return f"override {pair!r} is not section.key=value"
        if section not in fields or name not in fields[section]:
            return f"override {pair!r}: no key {name!r} in section {section!r}"
    return None


def test_the_docs_pages_exist_and_end_with_where_to_go_next():
    assert [p for p in REQUIRED_PAGES if not (REPO / "docs" / f"{p}.md").is_file()] == []
    for page in sorted((REPO / "docs").glob("*.md")):
        assert "\n## Where to go next\n" in page.read_text(), f"{rel(page)} does not end with 'Where to go next'"
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_every_documented_command_parses_against_the_cli():
    commands = documented_commands()
    assert len(commands) > 50 and {argv[0] for _, argv, _ in commands if argv} >= {
        "demo", "collect", "train", "eval", "serve", "bench", "pretrain-base", "import-lerobot"}
    fields = override_fields()
    wrong = [f"{page}: vla-peft {shlex.join(argv)}\n    -> {problem}"
             for page, argv, whole in commands if (problem := check_command(argv, whole, fields))]
    assert not wrong, "documented commands the CLI does not accept:\n" + "\n".join(wrong)


def test_every_repository_path_named_in_the_docs_exists():
    missing = []
    for page in PAGES:
        for path in REPO_PATH.findall(page.read_text()):
            path = path.rstrip(".,")
            if not re.search(r"-v\d+$", path) and not (REPO / path).exists():  # vla_peft/Reach-v0 is a gym id
                missing.append(f"{rel(page)}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{rel(page)}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's minimal example, run as written from a directory holding the repo's configs."""
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(block, "README.md example", "exec"), {})
    assert "trainable" in out.getvalue() and (tmp_path / "runs" / "adapter" / "adapter_config.json").is_file()
