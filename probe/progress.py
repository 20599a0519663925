"""Progress of the long computations, for the command line and the app alike.

`steps(iterable, desc)` is tqdm's bar on the terminal; within `reporting(show)`, it also calls
show(desc, n, total) before the first step and after each one, so that the app draws on the page the same n of N
that the command line prints. What `reporting` sets is a context variable: each thread (each app session) sees its
own computations only.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

Show = Callable[[str, int, "int | None"], None]  # (what is being done, steps done, steps in all or None)
T = TypeVar("T")

_SHOW: ContextVar[Show | None] = ContextVar("probe_progress", default=None)


@contextlib.contextmanager
def reporting(show: Show) -> Iterator[None]:
    """Within it, every `steps` loop of this thread also reports to `show`."""
    token = _SHOW.set(show)
    try:
        yield
    finally:
        _SHOW.reset(token)


def steps(iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None, leave: bool = True) -> Iterator[T]:
    """The items of `iterable` under a tqdm bar named `desc`, each reported to the `reporting` callback if any."""
    show = _SHOW.get()
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
    if show is None:
        yield from bar
        return
    show(desc, 0, total)
    for done, item in enumerate(bar, 1):
        yield item
        show(desc, done, total)
