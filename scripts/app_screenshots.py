"""Screenshots of every tab of the real app and its timings: `python scripts/app_screenshots.py` (SmolLM2 and the
runs that git tracks in runs/ by default, copied into build/screenshot-runs/ so that runs trained there since, by
a user or by `make notebooks`, stay out of the pictures). Writes OUT/TAB.png (one per tab) and OUT/timings.json,
and prints the timings.

Timings, each from the action to the end of the script run it starts, as the browser sees it (a chart must be
drawn too):
    model_load_s        the first page load of a fresh server: the base model is loaded
    first_paint_s       a new page (a new session) once the model is loaded: the Generate tab drawn
    first_visit_s[TAB]  each tab opened the first time in that server (what is not cached yet is computed); a tab
                        that computes only when asked (Mechanism) is asked, with its default choices
    warm_s[TAB]         each tab opened again, everything cached
Disk caches (the probe's activations, st.cache_data's) outlive the server: run it twice for a warm disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from app_browser import (
    ROOT,
    browser_page,
    open_app,
    open_tab,
    served_app,
    wait_for_chart,
    wait_until_idle,
)

from aligner import DEFAULT_MODEL

TIMEOUT_S = 1200  # a first visit computes what no cache holds yet: minutes on a loaded CPU

VIEWS = ("Generate", "Gates", "Embeddings", "Probes", "Geometry", "Mechanism", "Efficiency", "Train")
# Tabs that compute only once asked (the label of the toggle that asks): the visit is timed with it switched on.
ASKED = {"Mechanism": "Compute"}


def timed(action, page) -> float:
    """Seconds from `action` to the last moment the browser saw its script running (0 for a run shorter than
    the 0.1 s poll); a chart must be drawn by then."""
    started = time.monotonic()
    last_running = action()
    wait_for_chart(page, TIMEOUT_S)
    return round(last_running - started, 1)


def visit(page, view: str) -> float:
    """Open tab `view`, switch its computation on where it waits for that (`ASKED`); return when the script run
    was last seen running."""
    last_running = open_tab(page, view, TIMEOUT_S)
    if view in ASKED:
        page.get_by_text(ASKED[view]).first.click()
        last_running = wait_until_idle(page, TIMEOUT_S)
    return last_running


def committed_runs(target: Path) -> Path:
    """A fresh copy under `target` of the files that git tracks in runs/ (their times kept, as the app's caches key
    runs by them); returns the copy's runs directory."""
    shutil.rmtree(target, ignore_errors=True)
    listing = subprocess.run(["git", "ls-files", "-z", "runs"], cwd=ROOT, check=True, capture_output=True, text=True)
    for name in filter(None, listing.stdout.split("\0")):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return target / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", help="runs directory (default: a copy of the runs git tracks in runs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs = args.runs or str(committed_runs(ROOT / "build" / "screenshot-runs"))
    env = {"ALIGNER_APP_MODEL": args.model, "ALIGNER_APP_RUNS": args.runs}
    timings: dict = {"model": args.model, "runs": args.runs, "first_visit_s": {}, "warm_s": {}}
    with served_app(env) as url, browser_page(args.width, args.height) as page:
        timings["model_load_s"] = timed(lambda: open_app(page, url, TIMEOUT_S), page)
        for view in VIEWS:
            timings["first_visit_s"][view] = timed(lambda: visit(page, view), page)
            print(f"first visit {view}: {timings['first_visit_s'][view]} s", flush=True)
        timings["first_paint_s"] = timed(lambda: open_app(page, url, TIMEOUT_S), page)
        for view in VIEWS:
            timings["warm_s"][view] = timed(lambda: visit(page, view), page)
            page.screenshot(path=str(args.out / f"{view.lower()}.png"))
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
