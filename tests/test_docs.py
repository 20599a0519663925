"""The documentation: every generated block is what its command prints from the committed data (docs/check.py,
`make docs-check`), and the pages a user reads first stay short."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("docs_check", ROOT / "docs" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


check = load_check()


def test_every_generated_block_is_what_its_command_prints():
    problems = check.check(ROOT, in_process=True)
    assert not problems, "\n\n".join(problems) + "\n\n`python docs/check.py --write` regenerates stale blocks"


def test_the_readme_is_at_most_15000_bytes():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 15_000, f"README.md is {size:,} bytes: move the detail to docs/"


def test_the_benchmark_results_page_is_at_most_12000_bytes():
    size = (ROOT / "benchmarks" / "RESULTS.md").stat().st_size
    assert size <= 12_000, f"benchmarks/RESULTS.md is {size:,} bytes: its history belongs in git, its tables in data"


GENERATOR = 'print("| a | b |")\nprint("| --- | --- |")\nprint("| 1 | 2 |")\n'


def page(text: str) -> str:
    return f"# Page\n\n<!-- generated: python gen.py -->\n{text}\n<!-- end generated -->\n\nAfter.\n"


def test_a_stale_block_is_named_by_file_line_and_diff_and_write_regenerates_it(tmp_path: Path):
    (tmp_path / "gen.py").write_text(GENERATOR)
    (tmp_path / "docs").mkdir()
    stale = tmp_path / "docs" / "page.md"
    stale.write_text(page("\n| a | b |\n| --- | --- |\n| 1 | 3 |\n"))
    problems = check.check(tmp_path, in_process=True)
    assert len(problems) == 1
    assert problems[0].startswith("docs/page.md:3: ")
    assert "-| 1 | 3 |" in problems[0] and "+| 1 | 2 |" in problems[0]

    assert check.check(tmp_path, write=True, in_process=True) == []
    assert stale.read_text() == page("\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    assert check.check(tmp_path, in_process=True) == []


def test_blocks_are_found_in_the_readme_and_the_benchmark_results_but_not_in_fenced_code(tmp_path: Path):
    (tmp_path / "gen.py").write_text(GENERATOR)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text("```\n" + page("anything") + "```\n")
    (tmp_path / "benchmarks" / "RESULTS.md").write_text(page("stale"))
    problems = check.check(tmp_path, in_process=True)
    assert [p.split(": ")[0] for p in problems] == ["benchmarks/RESULTS.md:3"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- generated: python gen.py -->\n", "README.md:1: a generated block without '<!-- end generated -->'"),
        ("<!-- end generated -->\n", "README.md:1: '<!-- end generated -->' without a block begun before it"),
        ("<!-- generated: ls -->\n<!-- end generated -->\n", "README.md:1: `ls` failed:\nexpected `python -m MODULE"),
    ],
)
def test_a_misplaced_marker_or_a_command_that_is_not_python_is_a_problem(tmp_path: Path, text: str, message: str):
    (tmp_path / "README.md").write_text(text)
    (problem,) = check.check(tmp_path, in_process=True)
    assert problem.startswith(message)


def test_a_failing_command_is_reported_at_its_block(tmp_path: Path):
    (tmp_path / "gen.py").write_text("raise SystemExit(2)\n")
    (tmp_path / "README.md").write_text(page(""))
    (problem,) = check.check(tmp_path, in_process=True)
    assert problem.startswith("README.md:3: `python gen.py` failed:\nexited with status 2")
