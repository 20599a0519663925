"""benchmarks.report: the tables of benchmarks/RESULTS.md rendered from the result files alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.common import Variant, ratio, ratio_interval

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "shape", "device", "commit", "command", "machine", "model", "tables"}


def result(tmp_path: Path, name: str, **fields) -> Path:
    data = {
        "benchmark": "throughput",
        "shape": "smollm2",
        "device": "CPU",
        "commit": "abc1234",
        "command": "python -m benchmarks.throughput --device cpu",
        "machine": "x86_64, 2 cores",
        "model": "smollm2",
        "tables": {
            "training": [
                {"variant": "bridge, frozen, input gradients", "tokens_per_s": 64.0, "vs_bridge": 1.0},
                {"variant": "bridge + aligner N=1", "tokens_per_s": 66.0, "vs_bridge": 1.03},
                {"variant": "bridge + aligner N=10", "tokens_per_s": 58.0, "vs_bridge": 0.89},
                {"variant": "bridge + peft LoRA r=8 q,v", "vs_bridge": 0.935},
            ]
        },
        **fields,
    }
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_device_table_names_commit_command_and_leaves_out_rows_without_numbers(tmp_path):
    result(tmp_path, "cpu-throughput-smollm2.json")
    text = report.device_table("cpu", tmp_path)
    assert text.startswith("Commit abc1234.")
    assert "- x86_64, 2 cores" in text
    assert "- `python -m benchmarks.throughput --device cpu`" in text
    assert "| training, bridge: tokens/s | 64 |" in text
    assert "| training: aligner N=10 | 0.890 |" in text
    assert "bank" not in text and "forward" not in text


def test_targets_mark_gpus_alone(tmp_path):
    result(tmp_path, "cpu-throughput-smollm2.json")
    result(tmp_path, "h200-throughput-smollm2.json", device="NVIDIA H200")
    rows = {line.split(" | ")[0]: line for line in report.targets_table(tmp_path).splitlines()}
    assert rows["| training, N=1, SmolLM2: >= 0.95"].endswith("| 1.030 yes | 1.030 |")
    assert rows["| training, N=10, SmolLM2: >= 0.90"].endswith("| 0.890 no | 0.890 |")
    ahead = rows["| training ahead of peft, SmolLM2-135M: lower aligner vs best peft"]
    assert ahead.endswith("| 0.890 vs 0.935 no | 0.890 vs 0.935 |")


def test_intervals_are_printed_and_a_gpu_target_they_straddle_cannot_be_told(tmp_path):
    path = result(tmp_path, "h200-throughput-smollm2.json", device="NVIDIA H200")
    data = json.loads(path.read_text())
    data["tables"]["training"][1]["vs_bridge_interval"] = [0.94, 1.08]  # N=1 against >= 0.95: straddles
    data["tables"]["training"][2]["vs_bridge_interval"] = [0.91, 0.95]  # N=10 against >= 0.90: met
    path.write_text(json.dumps(data))
    assert "| training: aligner N=1 | 1.030 [0.940, 1.080] |" in report.device_table("h200", tmp_path)
    rows = {line.split(" | ")[0]: line for line in report.targets_table(tmp_path).splitlines()}
    assert rows["| training, N=1, SmolLM2: >= 0.95"].endswith("| 1.030 [0.940, 1.080] cannot tell |")
    assert rows["| training, N=10, SmolLM2: >= 0.90"].endswith("| 0.890 [0.910, 0.950] yes |")
    data["tables"]["training"][2]["vs_bridge_interval"] = [0.85, 0.89]
    path.write_text(json.dumps(data))
    rows = {line.split(" | ")[0]: line for line in report.targets_table(tmp_path).splitlines()}
    assert rows["| training, N=10, SmolLM2: >= 0.90"].endswith("| 0.890 [0.850, 0.890] no |")


def test_a_ratios_interval_spans_the_rounds_median():
    reference = Variant("floor", call=lambda: None, seconds=[1.0] * 7)
    variant = Variant("method", call=lambda: None, seconds=[1.0, 1.02, 0.98, 1.05, 1.01, 0.97, 1.03])
    low, high = ratio_interval(variant, reference)
    assert low <= ratio(variant, reference) <= high and 1 / 1.05 <= low and high <= 1 / 0.97
    assert ratio_interval(Variant("two rounds", call=lambda: None, seconds=[1.0, 1.1]), reference) is None


def test_compare_flags_a_ratio_beyond_the_tolerance(tmp_path):
    old = result(tmp_path, "old.json")
    new = json.loads(old.read_text())
    new["tables"]["training"][2]["vs_bridge"] = 0.80
    (tmp_path / "new.json").write_text(json.dumps(new))
    lines = report.compare(old, tmp_path / "new.json").splitlines()
    assert any("bridge + aligner N=10" in line and "-10.1%" in line and "outside" in line for line in lines)
    assert any("bridge + aligner N=1 |" in line and "+0.0%" in line and "outside" not in line for line in lines)


def test_committed_results_render():
    for path in sorted(report.RESULTS.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert KEYS <= set(data), path
        assert path.name.startswith(tuple(f"{d}-" for d in report.DEVICES)), path
    for device in report.DEVICES:
        if report.load(device):
            assert "| / floor |" in report.device_table(device)
    assert report.targets_table().startswith("| target |")


@pytest.mark.parametrize("args", [["targets"], ["device", "h200"]])
def test_runs_as_a_module_without_torch(args):
    code = (
        "import sys, runpy; sys.argv = ['report', *sys.argv[1:]]; "
        "runpy.run_module('benchmarks.report', run_name='__main__'); assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.startswith(("| target |", "Commit "))
