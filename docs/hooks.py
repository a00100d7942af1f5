"""MkDocs hooks: pages include generated files at build time, so the site cannot drift from them.

A line ``<!-- include: PATH -->`` in a page is replaced by the file at PATH
(relative to the repository root), its headings moved below the page's own.
``<!-- include: PATH#NAME -->`` takes only the lines between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in that file. The results
page includes every ``benchmarks/results/*/results.md`` this way, and the build
fails if one is left out. The PNG plots under ``benchmarks/results/`` are added
to the site at the same relative paths, so a page links them as
``benchmarks/results/...``.

This file needs only MkDocs: CI builds the site before it installs difftx-edge.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

INCLUDE = re.compile(r"^<!-- include: (?P<path>[^#\s]+)(?:#(?P<name>[\w-]+))? -->$")
RESULTS = "benchmarks/results/*/results.md"

_included: set[str] = set()


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    """Add the benchmark plots to the site; reset what has been included (``mkdocs serve`` rebuilds)."""
    _included.clear()
    root = _root(config)
    for png in sorted((root / "benchmarks" / "results").rglob("*.png")):
        files.append(File.generated(config, png.relative_to(root).as_posix(), abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    root = _root(config)
    out, level, fenced = [], 0, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#+) ", line)
        if heading:
            level = len(heading.group(1))
        match = INCLUDE.match(line.strip())
        if not match:
            out.append(line)
            continue
        path = (root / match["path"]).resolve()
        if root not in path.parents or not path.is_file():
            raise PluginError(f"{page.file.src_uri}: {line.strip()} names no file in the repository")
        text = path.read_text(encoding="utf-8")
        if match["name"]:
            text = _between(text, match["name"], path)
        _included.add(path.relative_to(root).as_posix())
        out.append(_demote(text, level))
    return "\n".join(out) + "\n"


def on_post_build(config):
    """Every results.md has a place on the site: a new benchmark cannot be left out of it."""
    root = _root(config)
    missing = sorted(p.relative_to(root).as_posix() for p in root.glob(RESULTS)
                     if p.relative_to(root).as_posix() not in _included)
    if missing:
        raise PluginError(f"no page includes {', '.join(missing)}: add an include line to docs/results.md")


def _between(text: str, name: str, path: Path) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise PluginError(f"{path.name} has no {start} ... {end} block")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def _demote(text: str, level: int) -> str:
    """Headings of an included file go below the heading the include line stands under."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"^#+ ", line):
            line = "#" * level + line
        lines.append(line)
    return "\n".join(lines)
