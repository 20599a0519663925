"""Check that every generated block of the documentation is what its command prints now.

A generated block is a stretch of Markdown between two marker lines; the first names the command that prints it:

    <!-- generated: python -m experiments.readme_tables json -->
    | method | parameters | ... |
    <!-- end generated -->

Blocks are looked for in README.md, docs/*.md and benchmarks/RESULTS.md (not inside fenced code). A command is
`python -m MODULE ARGS` or `python PATH.py ARGS`, run from the repository's root with the venv's python. It must
only render committed data (results/sweep.json, a CSV), never rerun an experiment: the check runs every command
on each call. All the commands run in one process, so that torch and the aligner are imported once.

    python docs/check.py           # exit 1 naming the file, the line and a unified diff for each stale block
    python docs/check.py --write   # rewrite every block in place with what its command prints

`make docs-check` runs the first; tests/test_docs.py runs the same check.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md", "benchmarks/RESULTS.md")  # globs, relative to the root
START = re.compile(r"^<!-- generated: (?P<command>.+?) -->\s*$")
END = re.compile(r"^<!-- end generated -->\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
TIMEOUT_S = 600  # for all the commands together


@dataclass(frozen=True)
class Block:
    """One generated block: `start` and `end` are the 1-based lines of its two markers."""

    path: Path
    start: int
    end: int
    command: str
    text: str  # the lines between the markers, blank lines at either end left out

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.start}"


class MarkerError(ValueError):
    """A marker out of place: an end without a start, a start inside a block, a block never ended."""


def pages(root: Path) -> list[Path]:
    """The Markdown files that may hold generated blocks, in a fixed order."""
    found: list[Path] = []
    for pattern in PAGES:
        found += sorted(p for p in root.glob(pattern) if p.is_file())
    return found


def strip_blank(lines: Iterable[str]) -> str:
    return "\n".join(lines).strip("\n")


def find_blocks(path: Path) -> list[Block]:
    """The generated blocks of one Markdown file; a misplaced marker raises MarkerError naming file and line."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced, open_at, command = False, 0, ""
    for number, line in enumerate(lines, start=1):
        if open_at:
            if START.match(line):
                raise MarkerError(f"{path}:{number}: a generated block starts inside the one begun at line {open_at}")
            if END.match(line):
                blocks.append(Block(path, open_at, number, command, strip_blank(lines[open_at : number - 1])))
                open_at = 0
            continue
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := START.match(line)):
            open_at, command = number, match["command"]
        elif not fenced and END.match(line):
            raise MarkerError(f"{path}:{number}: '<!-- end generated -->' without a block begun before it")
    if open_at:
        raise MarkerError(f"{path}:{open_at}: a generated block without '<!-- end generated -->' after it")
    return blocks


def run_commands(commands: list[str], root: Path) -> dict[str, dict[str, str]]:
    """Run each command in this process, as `python` would from `root`: {command: {"stdout"} or {"error"}}."""
    results: dict[str, dict[str, str]] = {}
    for command in commands:
        argv = shlex.split(command)
        if len(argv) < 2 or argv[0] != "python" or (argv[1] == "-m" and len(argv) < 3):
            results[command] = {"error": "expected `python -m MODULE ARGS` or `python PATH.py ARGS`"}
            continue
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        out = io.StringIO()
        try:
            with contextlib.chdir(root), contextlib.redirect_stdout(out):
                if argv[1] == "-m":
                    sys.argv = [argv[2], *argv[3:]]
                    sys.path.insert(0, str(root))
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = argv[1:]
                    sys.path.insert(0, str((root / argv[1]).parent))
                    runpy.run_path(str(root / argv[1]), run_name="__main__")
            results[command] = {"stdout": out.getvalue()}
        except SystemExit as stop:
            if stop.code in (None, 0):
                results[command] = {"stdout": out.getvalue()}
            else:
                results[command] = {"error": f"exited with status {stop.code}\n{out.getvalue()}"}
        except Exception:  # the command's own failure, reported at its block
            results[command] = {"error": traceback.format_exc()}
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
    return results


def python() -> str:
    """The venv's python, where there is one; else this one."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def render(commands: list[str], root: Path, in_process: bool = False) -> dict[str, dict[str, str]]:
    """What each command prints: in one child process of the venv's python, or in this one (`in_process`)."""
    if in_process or not commands:
        return run_commands(commands, root)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run(
            [python(), str(Path(__file__).resolve()), "--worker", str(result), "--root", str(root)],
            input=json.dumps(commands), text=True, cwd=root, timeout=TIMEOUT_S, check=True,
        )  # fmt: skip
        return json.loads(result.read_text(encoding="utf-8"))


def check(root: Path = ROOT, write: bool = False, in_process: bool = False) -> list[str]:
    """Every problem found, as text (empty: every block is current). With `write`, stale blocks are rewritten
    in place and are no longer problems; a misplaced marker or a failing command still is."""
    problems: list[str] = []
    blocks: list[Block] = []
    for path in pages(root):
        try:
            blocks += find_blocks(path)
        except MarkerError as error:
            problems.append(str(error).replace(f"{root}/", ""))
    outputs = render(list(dict.fromkeys(b.command for b in blocks)), root, in_process)
    stale: dict[Path, list[tuple[Block, str]]] = {}
    for block in blocks:
        result = outputs[block.command]
        if "error" in result:
            problems.append(f"{block.where(root)}: `{block.command}` failed:\n{result['error'].rstrip()}")
            continue
        expected = result["stdout"].strip("\n")
        if expected == block.text:
            continue
        if write:
            stale.setdefault(block.path, []).append((block, expected))
            continue
        diff = difflib.unified_diff(
            block.text.splitlines(), expected.splitlines(), lineterm="",
            fromfile=f"{block.where(root)} (the page)", tofile=f"{block.command} (now)",
        )  # fmt: skip
        problems.append(f"{block.where(root)}: the block differs from what `{block.command}` prints:\n" + "\n".join(diff))
    for path, changes in stale.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for block, expected in sorted(changes, key=lambda change: -change[0].start):  # from the bottom up
            lines[block.start : block.end - 1] = ["", *expected.splitlines(), ""]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"rewrote {len(changes)} block(s) in {path.relative_to(root)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite stale blocks in place")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # run the commands on stdin, into this file
    args = parser.parse_args()
    if args.worker:
        results = run_commands(json.loads(sys.stdin.read()), args.root)
        args.worker.write_text(json.dumps(results), encoding="utf-8")
        return 0
    problems = check(args.root, write=args.write)
    for problem in problems:
        print(problem, end="\n\n", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s); `python docs/check.py --write` regenerates stale blocks", file=sys.stderr)
        return 1
    print("docs-check: every generated block is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
