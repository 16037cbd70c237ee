"""benchmarks/gpu/run.sh: valid bash, and every call into our CLIs is one their own parsers accept.

The script runs only on a GPU machine; this is what can be checked without one: `bash -n`, and each line
that calls `python -m piaa_export.cli`, `python -m piaa_triton.bench` or the Triton image's entry point
(deploy/triton/launch.py) parsed by the parser the module itself builds.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from piaa_export import cli as export_cli
from piaa_triton import bench
from tests.deploy_scripts import load_launch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "run.sh"

MODULE_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "piaa_export.cli": export_cli.parser,
    "piaa_triton.bench": bench.parser,
}
"""`-m <module>` calls in the script → the parser of that module's CLI."""


def logical_lines(text: str) -> list[str]:
    """The script's commands with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def words(line: str) -> list[str]:
    """A command's words with every shell expansion replaced by "8", a value every flag that takes one
    accepts (ints, paths, strings), redirections cut off."""
    line = re.sub(r"\$\(\([^)]*\)\)", "8", line)  # $((arithmetic))
    line = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "8", line)  # $VAR, ${VAR}
    line = line.split(">", 1)[0].split("|", 1)[0]
    return shlex.split(line)


def calls(text: str) -> list[tuple[str, list[str]]]:
    """(parser name, arguments) for every call of one of our CLIs in the script."""
    found = []
    for line in logical_lines(text):
        if any(f"-m {module}" in line for module in MODULE_PARSERS):
            tokens = words(line)
            i = tokens.index("-m")
            found.append((tokens[i + 1], tokens[i + 2 :]))
        elif ("in_container" in line or "docker run" in line) and '"$IMAGE"' in line:
            # The image's entry point is launch.py: what follows the image name are its arguments.
            found.append(("launch.py", words(line.split('"$IMAGE"', 1)[1].rstrip(")"))))
    return found


def test_the_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_it_reads_the_ngc_tag_from_the_dockerfile_and_writes_no_tag_itself() -> None:
    text = SCRIPT.read_text()
    assert "sed -n 's/^ARG NGC_TAG=//p' deploy/triton.Dockerfile" in text
    assert not re.search(r"tritonserver:\d", text), "the NGC tag is written in the Dockerfile only"


def test_it_calls_each_step_it_promises() -> None:
    called = {(name, args[0] if args else "") for name, args in calls(SCRIPT.read_text())}
    assert {("piaa_export.cli", "build"), ("piaa_export.cli", "quantize")} <= called
    assert ("piaa_export.cli", "engines") in called
    assert ("launch.py", "prepare") in called and ("launch.py", "serve") in called
    assert any(name == "piaa_triton.bench" for name, _ in called)


@pytest.mark.parametrize(("name", "args"), calls(SCRIPT.read_text()), ids=lambda v: str(v)[:40])
def test_every_call_is_accepted_by_its_parser(name: str, args: list[str]) -> None:
    parser = load_launch().build_parser() if name == "launch.py" else MODULE_PARSERS[name]()
    try:
        parser.parse_args(args)
    except SystemExit as exit_:  # argparse's way of refusing
        pytest.fail(f"{name} refuses {args}: exit {exit_.code}")


def test_a_wrong_flag_would_be_caught() -> None:
    # The check's control: the same parsing refuses a flag the CLI does not have.
    (engines,) = [args for name, args in calls(SCRIPT.read_text()) if args[:1] == ["engines"]]
    with pytest.raises(SystemExit):
        export_cli.parser().parse_args([*engines, "--precision", "fp16"])
