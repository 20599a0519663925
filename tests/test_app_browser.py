"""The app in a real browser: `streamlit run app.py` headless on the tiny model with a tiny trained run of each
kind, opened in headless Chromium (playwright); every tab draws a plotly chart and shows no Streamlit exception
block; a pickle planted in Streamlit's disk cache is never read; two pages generating at once on the one shared
model both get their answers. Screenshots of each tab go to test-artifacts/browser/."""

import os
import pickle
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
    CHART,
    CHROMIUM,
    browser_page,
    browser_pages,
    errors,
    exceptions,
    open_app,
    open_tab,
    served_app,
    wait_for_chart,
    wait_until_idle,
)

VIEWS = ("Generate", "Gates", "Embeddings", "Probes", "Geometry", "Efficiency", "Train")
ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The app's environment: the tiny model and a run of each kind, trained for two steps."""
    runs = tmp_path_factory.mktemp("runs")
    model = open_model("tiny")
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1)
    examples = load_examples(ROOT / "examples" / "json_form.jsonl")[:8]
    for name, kind in (("json-aligner", "aligner"), ("json-adapter", "adapter"), ("json-lora", "lora")):
        train_run(model, examples, runs / name, kind, 1, config)
    return {
        "ALIGNER_APP_MODEL": "tiny",
        "ALIGNER_APP_KNOWN_ONLY": "0",  # a random model knows no fact
        "ALIGNER_APP_RUNS": str(runs),
        "ALIGNER_APP_PAPERS": str(PAPER_ALIGNERS) if PAPER_ALIGNERS.is_dir() else "",
        "ALIGNER_APP_RESULTS": str(ROOT / "results"),
        "OMP_NUM_THREADS": "1",
    }


class Planted:
    """A pickle that, once loaded, creates the file `marker`: what an attacker would put in a cache file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_every_tab_draws_a_chart_in_a_real_browser_without_exceptions(env):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with served_app(env) as url, browser_page() as page:
        open_app(page, url)
        for view in VIEWS:
            open_tab(page, view)
            wait_for_chart(page)
            page.screenshot(path=str(ARTIFACTS / f"{view.lower()}.png"), full_page=True)
            assert exceptions(page) == [], f"{view}: {exceptions(page)}"
        assert errors(page) == []


def test_a_pickle_planted_in_streamlits_disk_cache_is_never_loaded(env, tmp_path):
    """Streamlit keeps `st.cache_data(persist="disk")` results as pickles in ~/.streamlit/cache/*.memo and loads
    them when a page asks again. The app is opened on Generate (its answers are cached), every `.memo` file there
    is then replaced by a crafted pickle, one more is planted beside them, and the app is served and opened again:
    nothing may load them."""
    home = tmp_path / "home"
    cache = home / ".streamlit" / "cache"
    cache.mkdir(parents=True)
    aligner_cache = os.environ.get("ALIGNER_CACHE", str(Path.home() / ".cache" / "aligner-workbench"))
    env = {**env, "HOME": str(home), "ALIGNER_CACHE": aligner_cache}  # the models' cache stays where it is
    marker = tmp_path / "pickle-ran"
    with served_app(env) as url, browser_page() as page:
        open_app(page, url)
        wait_for_chart(page)
    for memo in [*cache.glob("*.memo"), cache / "planted.memo"]:
        memo.write_bytes(pickle.dumps(Planted(marker)))
    with served_app(env) as url, browser_page() as page:
        open_app(page, url)
        wait_for_chart(page)
        assert exceptions(page) == []
    assert not marker.exists(), "a pickle in ~/.streamlit/cache was loaded"
    assert [p.name for p in cache.iterdir()] == ["planted.memo"]  # the app wrote nothing there that it would read


def test_two_pages_generating_at_once_both_get_their_answers(env):
    """Two users on Generate submit prompts at the same moment, three times: every answer runs on the one shared
    model, which each attaches its runs to and removes them from; neither page may show an error or lack its
    answers and prefix-attention charts."""
    with served_app(env) as url, browser_pages(2) as pages:
        for page in pages:
            open_app(page, url)
            wait_for_chart(page)
        for round in range(3):
            for number, page in enumerate(pages):
                page.get_by_role("textbox", name="Prompt", exact=True).fill(f"Round {round}: what is {number} plus {round}?")
            for page in pages:  # submitted together: both script runs overlap
                page.get_by_role("textbox", name="Prompt", exact=True).press("Control+Enter")
            for page in pages:
                wait_until_idle(page)
            for number, page in enumerate(pages):
                assert exceptions(page) == [] and errors(page) == [], f"page {number}, round {round}: {errors(page)}"
                assert page.get_by_role("heading", name="Base model", exact=True).count() == 1
                # the prefix-attention charts: a one-token run's slot panel is a sentence, not a chart
                assert page.locator(f'[role="tabpanel"]:not([hidden]) {CHART}').count() >= 1, f"page {number}, round {round}"
