"""What a Dockerfile of deploy/ puts into its image, read from the Dockerfile and its .dockerignore.

The tests rebuild an image's files from its COPY lines (only what the build context lets through) and read
its ARG defaults and ENV, so a check of "the image" follows the Dockerfile as written, not a copy of it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    """Every `ARG NAME=default` of the Dockerfile."""
    out = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name.strip()] = value.strip()
    return out


def env(dockerfile: Path) -> dict[str, str]:
    """Every ENV NAME=value of the Dockerfile (the last one wins)."""
    out: dict[str, str] = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def expand(text: str, values: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by the ARG defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


@dataclass(frozen=True)
class Copy:
    """One COPY from the build context: its sources (relative to the context) and the destination."""

    sources: tuple[str, ...]
    destination: str


def copies(dockerfile: Path) -> list[Copy]:
    """The COPY instructions that read the build context (not --from another stage)."""
    out = []
    for keyword, rest in instructions(dockerfile):
        if keyword != "COPY":
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        out.append(Copy(tuple(parts[:-1]), parts[-1]))
    return out


def context_files(dockerfile: Path) -> set[str]:
    """The repository files (relative paths) the build context holds, per <Dockerfile>.dockerignore."""
    ignore = Path(f"{dockerfile}.dockerignore")
    patterns = [
        line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    kept = set()
    for path in REPO_ROOT.rglob("*"):
        if not path.is_file() or ".venv" in path.parts or ".git" in path.parts:
            continue
        rel = path.relative_to(REPO_ROOT).as_posix()
        if _included(rel, patterns):
            kept.add(rel)
    return kept


def in_context(dockerfile: Path, rel: str) -> bool:
    """Whether the build context would hold the repository path `rel` (it need not exist)."""
    ignore = Path(f"{dockerfile}.dockerignore")
    lines = (line.strip() for line in ignore.read_text().splitlines())
    return _included(rel, [line for line in lines if line and not line.startswith("#")])


def _included(rel: str, patterns: list[str]) -> bool:
    included = True
    for pattern in patterns:  # the last matching pattern decides, as in Docker
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if _matches(rel, body):
            included = negate
    return included


def copied_by(copy: Copy, rel: str) -> bool:
    """Whether a COPY source names the context file `rel`: the file itself, a folder above it, or a
    wildcard (Docker's: `*` stops at `/`) that matches it."""
    for source in copy.sources:
        if rel == source or rel.startswith(source.rstrip("/") + "/"):
            return True
        if any(c in source for c in "*?[") and re.fullmatch(_glob_regex(source), rel):
            return True
    return False


def _glob_regex(pattern: str) -> str:
    return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern)


def _matches(rel: str, pattern: str) -> bool:
    pattern = pattern.rstrip("/")
    if pattern == "**":
        return True
    if pattern.startswith("**/"):
        name = pattern[3:]
        return any(fnmatch.fnmatch(part, name) for part in rel.split("/"))
    return rel == pattern or rel.startswith(pattern + "/") or fnmatch.fnmatch(rel, pattern)


def image_tree(dockerfile: Path, root: Path) -> dict[str, str]:
    """Copies what the Dockerfile's COPY lines put into the image under `root` (image path /x → root/x).

    Returns image path → repository path of every file copied. Sources missing from the build context
    (ignored, or absent) are skipped, as Docker would fail or skip them; the tests check the result imports.
    """
    available = context_files(dockerfile)
    placed: dict[str, str] = {}
    for copy in copies(dockerfile):
        wildcard = any(c in source for source in copy.sources for c in "*?[")
        multiple = len(copy.sources) > 1 or copy.destination.endswith("/") or wildcard
        for source in copy.sources:
            one = Copy((source,), copy.destination)
            matches = sorted(f for f in available if copied_by(one, f))
            for rel in matches:
                if rel == source or not rel.startswith(source.rstrip("/") + "/"):
                    target = copy.destination + (Path(rel).name if multiple else "")
                else:
                    target = copy.destination.rstrip("/") + "/" + rel[len(source.rstrip("/")) + 1 :]
                dest = root / target.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO_ROOT / rel, dest)
                placed[target] = rel
    return placed
