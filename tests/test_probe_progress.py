"""The progress that the command line prints reaches a `reporting` callback too, n of N, in this thread only."""

import threading

from probe.progress import reporting, steps


def test_steps_report_each_step_done_within_reporting_and_nothing_outside():
    seen = []
    with reporting(lambda desc, done, total: seen.append((desc, done, total))):
        assert [x * 2 for x in steps(range(3), "doubling")] == [0, 2, 4]
    assert seen == [("doubling", 0, 3), ("doubling", 1, 3), ("doubling", 2, 3), ("doubling", 3, 3)]
    list(steps(range(2), "unreported"))
    assert len(seen) == 4


def test_another_threads_steps_are_not_reported_here():
    seen = []
    with reporting(lambda desc, done, total: seen.append(desc)):
        other = threading.Thread(target=lambda: list(steps(range(2), "elsewhere")))
        other.start()
        other.join()
    assert seen == []
