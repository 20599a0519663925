"""The app in a real browser: `streamlit run app.py` headless on the tiny model with a tiny trained run of each
kind, opened in headless Chromium (playwright); every tab draws a plotly chart and shows no Streamlit exception
block. Screenshots of each tab go to test-artifacts/browser/."""

import sys
from pathlib import Path

import pytest
from conftest import PAPER_ALIGNERS

from aligner import TrainConfig
from aligner.data import load_examples
from aligner.loading import open_model
from aligner.runs import train_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from app_browser import (  # noqa: E402
    CHROMIUM,
    browser_page,
    exceptions,
    open_app,
    open_tab,
    served_app,
    wait_for_chart,
)

VIEWS = ("Generate", "Gates", "Embeddings", "Probes", "Geometry", "Efficiency", "Train")
ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"),
]


def test_every_tab_draws_a_chart_in_a_real_browser_without_exceptions(tmp_path):
    model = open_model("tiny")
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1)
    examples = load_examples(ROOT / "examples" / "json_form.jsonl")[:8]
    for name, kind in (("json-aligner", "aligner"), ("json-adapter", "adapter"), ("json-lora", "lora")):
        train_run(model, examples, tmp_path / "runs" / name, kind, 1, config)
    env = {
        "ALIGNER_APP_MODEL": "tiny",
        "ALIGNER_APP_RUNS": str(tmp_path / "runs"),
        "ALIGNER_APP_PAPERS": str(PAPER_ALIGNERS) if PAPER_ALIGNERS.is_dir() else "",
        "ALIGNER_APP_RESULTS": str(ROOT / "results"),
        "OMP_NUM_THREADS": "1",
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with served_app(env) as url, browser_page() as page:
        open_app(page, url)
        for view in VIEWS:
            open_tab(page, view)
            wait_for_chart(page)
            page.screenshot(path=str(ARTIFACTS / f"{view.lower()}.png"), full_page=True)
            assert exceptions(page) == [], f"{view}: {exceptions(page)}"
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0
