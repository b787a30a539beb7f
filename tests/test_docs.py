"""The documentation: the README and docs/*.md stay true to the code and to each other."""

import re
from pathlib import Path

import pytest

from captioning.config import FIELDS_BEGIN, FIELDS_END, fields_markdown

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# [text](target) and ![alt](target), with an optional "title"; targets hold no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# The documentation says what is true now and how to reproduce it; git history keeps the log.
# Neither the README nor docs/*.md holds a commit hash (7 to 40 hex digits with a letter and a
# digit, so neither a word nor a number), a date, or an issue number (#top and &#38; are none) ...
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
DATE = re.compile(r"\b(19|20)\d\d-[01]\d-[0-3]\d\b")
ISSUE = re.compile(r"(?<![\w&/])#\d+\b")
# ... nor the words of a development log, case ignored: where and when a figure was measured
# ("working tree", "fresh clone of ...", "the machine was slower that hour", "this project's
# machine") and acceptance checklists ("Targets the presets were built to", "met" verdicts).
PROCESS_PHRASES = {  # words may wrap onto the next line
    "working tree": r"\bworking\s+(tree|copy)\b",
    "fresh clone": r"\bfresh\s+clones?\b",
    "a day or hour of the machine": r"\b(slower|faster|busier|quieter)\s+(days?|hours?)\b",
    "the day or hour of a run": r"\b(that|the\s+same|this)\s+(day|hour)\b",
    "the machine was slower": r"\bthe\s+machine\s+was\s+(slower|faster)\b",
    "this project's machine": r"\bthis\s+project's\s+machine\b",
    "acceptance targets": r"\btargets\s+the\s+presets?\s+(was|were)\s+built\s+to\b|^#+\s*targets\b",
    "met or missed": r"\b(met|missed)\b",
}
LINK_TARGET = re.compile(r"\]\([^)]*\)")  # a link's target, where #1-shapes is an anchor


def documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text):
    """`text` without code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", path.read_text()), re.MULTILINE)
    return {anchor(h) for h in headings}


def broken_links(path, root=ROOT):
    """'target: why' for each relative link of `path` that does not resolve under `root`."""
    broken = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif not linked.resolve().is_relative_to(root.resolve()):
            broken.append(f"{target}: outside the repository")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    return broken


def log_problems(text):
    """What no page may hold, outside code blocks: commit hashes, dates, issue numbers and the
    phrases of a development log (`PROCESS_PHRASES`)."""
    text = FENCE.sub("", text)
    found = [f"commit hash {m}" for m in COMMIT_HASH.findall(text)]
    found += [f"date {m.group(0)}" for m in DATE.finditer(text)]
    found += [f"issue reference {m}" for m in ISSUE.findall(LINK_TARGET.sub("]()", text))]
    for name, pattern in PROCESS_PHRASES.items():
        found += [f"{name}: {m.group(0)}" for m in re.finditer(pattern, text, re.I | re.M)]
    return found


def fields_block(text):
    """The generated table between the markers of docs/training.md."""
    assert text.count(FIELDS_BEGIN) == 1 and text.count(FIELDS_END) == 1
    return text.split(FIELDS_BEGIN + "\n", 1)[1].split(FIELDS_END, 1)[0]


def test_field_table_is_the_config_s():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert fields_block(text) == fields_markdown(), "docs/training.md is stale: run `make docs`"


def test_field_table_names_every_field_with_its_help():
    import dataclasses

    from captioning.config import TrainConfig

    table = fields_markdown()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` (`--{f.name.replace('_', '-')}" in table, f.name
        help_text = f.metadata["help"].replace("<", "&lt;").replace(">", "&gt;")
        assert help_text.replace("|", "\\|") in table, f.name


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_say_what_is_true_now_not_when_it_was_measured(path):
    assert log_problems(path.read_text(encoding="utf-8")) == []


def test_the_checks_catch_what_they_should(tmp_path):
    """Each check fails on a planted fault: a broken link or anchor, a date, a hash, an issue,
    a phrase of a development log; ordinary numbers, words and anchors pass."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A title\n\n## Some `code` here\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-code-here) [web](https://example.com/x)\n"
        "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
        "[missing](docs/b.md) [bad anchor](docs/a.md#nothing) ![image](docs/img.png)\n"
    )
    assert broken_links(page, tmp_path) == [
        "docs/b.md: no such file",
        "docs/a.md#nothing: no heading #nothing in a.md",
        "docs/img.png: no such file",
    ]
    clean = (
        "run 1,400 s, 0.586 CIDEr, 15.4% in 2,600 s, 1234567 steps, 3.125e-4, 000002000001.png;"
        " see #top, [three shapes](#3-shapes) and &#38; words: accepted, feedback,"
        " deadbeef, facade, metric, method, METEOR, a working model, this daylight, the target\n"
        "```\ncommit 0bd1973, 2026-11-29, the working tree\n```\n"
    )
    assert log_problems(clean) == []
    found = log_problems("a clone of 0bd1973 on 2026-11-29, issue #23")
    assert found == ["commit hash 0bd1973", "date 2026-11-29", "issue reference #23"]
    log = (
        "In the Working tree, a fresh clone of it; the machine was slower that hour, in a slower\n"
        "hour on this project's machine.\n## Targets of the transformer\n"
        "| target | met |\n|---|---|\n| at most 10 minutes | missed |\n"
        "Targets the presets were built to.\n"
    )
    assert [problem.split(":")[0] for problem in log_problems(log)] == [
        "working tree",
        "fresh clone",
        "a day or hour of the machine",
        "the day or hour of a run",
        "the machine was slower",
        "this project's machine",
        "acceptance targets",
        "acceptance targets",
        "met or missed",
        "met or missed",
    ]
    # Planted into a copy of a real page, each is found.
    page = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    assert log_problems(page) == []
    planted = page.replace(
        "\n## ", "\nMeasured in the working tree at 3e4020a on 2026-11-30.\n## ", 1
    )
    assert sorted(p.split(" ")[0] for p in log_problems(planted)) == ["commit", "date", "working"]
    text = f"x\n{FIELDS_BEGIN}\n{fields_markdown()}{FIELDS_END}\n"
    assert fields_block(text) == fields_markdown()
    changed = text.replace("LSTM hidden units", "LSTM units")
    assert fields_block(changed) != fields_markdown()


def test_the_resume_section_names_every_field_a_resume_may_change():
    from captioning.config import RESUMABLE_CHANGES

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("\n## Resume\n", 1)[1].split("\n## ", 1)[0]
    assert [f for f in RESUMABLE_CHANGES if f != "resume" and f"`{f}`" not in section] == []
