"""docs/bad_inputs.md is what the code prints today: `python docs/make_bad_inputs.py --check` reruns every case."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


def test_bad_inputs_table_is_what_the_code_prints():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "docs/make_bad_inputs.py", "--check"]
    check = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert check.returncode == 0, check.stderr[-2000:]
