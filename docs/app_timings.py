"""The app's timings as a Markdown table, from docs/screenshots/timings.json (what `make screenshots` wrote):
the model's first load, a page's first paint, and each tab's first and warm visit, in seconds from the click to
the end of the script run as the browser sees it. docs/app.md holds the output as a generated block.

    python docs/app_timings.py
"""

from __future__ import annotations

import json
from pathlib import Path

TIMINGS = Path(__file__).resolve().parent / "screenshots" / "timings.json"


def main() -> None:
    timings = json.loads(TIMINGS.read_text(encoding="utf-8"))
    print(f"Model `{timings['model']}`: first load {timings['model_load_s']:.1f} s, first paint of a page once it is "
          f"loaded {timings['first_paint_s']:.1f} s.")  # fmt: skip
    print()
    print("| tab | first visit (s) | warm (s) |")
    print("| --- | --- | --- |")
    for tab, first in timings["first_visit_s"].items():
        print(f"| {tab} | {first:.1f} | {timings['warm_s'][tab]:.1f} |")


if __name__ == "__main__":
    main()
