"""The model report's verdict on one aligner: does it change the form of the answers and leave the model's
knowledge alone? Five tests, each a threshold on numbers that `probe.analyses` computes:

    form_learned         form compliance gained over the base model        >= FORM_LEARNED
    content_kept         content accuracy lost against the base model      <= CONTENT_TOLERANCE
    knowledge_readable   accuracy lost by knowledge probes retrained on
                         the aligned activations                           <= PROBE_TOLERANCE
    knowledge_in_place   accuracy lost by base-trained knowledge probes on
                         the aligned activations, centred on the base mean <= PROBE_TOLERANCE
    orthogonal           share of adapted layers whose overlap with the
                         knowledge subspace is within the covariance null  >= WITHIN_NULL

The two probe tests tell apart an aligner that erases knowledge (retrained probes cannot read it) from one that
moves it (they can, but the base model's probes cannot): the paper's orthogonality asks for neither.
Supported: all five pass; partly supported: the form learned and one other test failing; not supported: else.
The thresholds are read against the report's default sizes: 48 held-out answers, 90 subjects asked two ways.

The geometry test has a positive control: a run that injects facts (the suite's inject task) writes knowledge,
so its effect must fail `orthogonal`. Where it passes, the test cannot tell an effect that writes knowledge from
one that leaves it alone, and `orthogonal` is "cannot tell" for every other run (`geometry_control`); an outcome
that hangs on it is "cannot tell" too.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probe.analyses import geometry_summary, transfer_losses

# Half the answers or more: the form becomes the answers' usual behaviour, not an occasional one. The base model
# uses the suite's forms by itself almost never, and the 95% interval of a share over 48 answers is at most
# +-14 points wide, so a gain this large is no sampling accident.
FORM_LEARNED = 0.5
# About five of 48 answers: within the sampling noise of an accuracy near the base model's (on known facts near
# 90-100%, about +-8 points over 48 answers), while a loss beyond it is knowledge the aligner hides.
CONTENT_TOLERANCE = 0.1
# Below one probe's own uncertainty (a 95% Wilson interval of +-7 points at 50% accuracy over 180 prompts), on a
# loss averaged over every adapted layer and label: a mean loss past it is knowledge lost or moved, not fold noise.
# The transferred probes read the centred activations, since a constant shift (which moves every probe's bias) is
# the geometry test's business; their raw loss is reported beside it.
PROBE_TOLERANCE = 0.05
# Each layer is held to the covariance null's 95% quantile, which one layer in twenty exceeds by chance: asking it
# of every layer would fail aligners on chance alone, while more than a fifth of the layers beyond it would be a
# rare event under the null (for 30 layers tested apart, p < 0.001).
WITHIN_NULL = 0.8
OUTCOMES = (
    "supported", "partly supported", "not supported", "cannot tell", "not supported (no form learned)", "untested (no known form)",
)


def orthogonal(geometry: pd.DataFrame) -> bool:
    """The geometry test on one run's `geometry_table`: Δ within the covariance null on at least WITHIN_NULL of its
    layers."""
    return geometry_summary(geometry)["within_null_share"] >= WITHIN_NULL


def geometry_control(geometry: dict[str, pd.DataFrame], controls: list[str]) -> dict[str, Any]:
    """The geometry test's positive control from `geometry` (run -> `geometry_table`): `controls`, the runs that
    inject facts, must each fail `orthogonal`. passed: whether they all do; None where the report has none."""
    detected = {name: not orthogonal(geometry[name]) for name in controls}
    return {"runs": controls, "detected": detected, "passed": all(detected.values()) if controls else None}


def control_sentence(control: dict[str, Any]) -> str:
    """What the positive control (`geometry_control`) says of the geometry test, in a sentence."""
    runs = ", ".join(control["runs"])
    if control["passed"] is None:
        return "No run among these injects facts: the test has no positive control here."
    if control["passed"]:
        return f"The positive control ({runs}) leaves the null: the test can tell an effect that writes knowledge."
    return (
        f"The positive control ({runs}) stays within the null: the test cannot tell an effect that writes knowledge "
        "from one that leaves it alone, and its verdict on the other runs is 'cannot tell'."
    )


def verdict(metrics: dict[str, Any], name: str, form: str | None, condition: str | None = None) -> dict[str, Any]:
    """The five tests on aligner `name` (trained for `form`; `condition`: its name in the probes' tables, if not
    `name`) from a report's `metrics` (its behaviour, probes and geometry sections): the numbers they read, which
    passed, and the outcome (one of OUTCOMES). Without a known form there is no behaviour to test, and the outcome
    is untested."""
    geometry = metrics["geometry"][name]
    losses = transfer_losses(metrics["probes"]["knowledge"], condition or name, geometry.layer)
    tests: dict[str, Any] = {
        "transfer_loss": losses["raw"],
        "centred_transfer_loss": losses["centred"],
        "retrained_loss": losses["retrained"],
        **geometry_summary(geometry),
    }
    control = metrics.get("geometry_control", {})
    undecided = control.get("passed") is False and name not in control.get("runs", ())
    passed: dict[str, bool | None] = {
        "knowledge_readable": tests["retrained_loss"] <= PROBE_TOLERANCE,
        "knowledge_in_place": tests["centred_transfer_loss"] <= PROBE_TOLERANCE,
        "orthogonal": None if undecided else tests["within_null_share"] >= WITHIN_NULL,
    }
    behaviour = metrics["behaviour"].get(name)
    if behaviour is not None:
        base = metrics["behaviour"]["base"]
        tests["form_gain"] = behaviour[f"form:{form}"] - base[f"form:{form}"]
        tests["content_change"] = behaviour["content"] - base["content"]
        passed["form_learned"] = tests["form_gain"] >= FORM_LEARNED
        passed["content_kept"] = tests["content_change"] >= -CONTENT_TOLERANCE
    if not passed.get("form_learned", False):
        outcome = "not supported (no form learned)" if behaviour is not None else "untested (no known form)"
    else:
        failing = [test for test, ok in passed.items() if ok is False]
        if len(failing) >= 2:
            outcome = "not supported"
        elif None in passed.values():  # the undecided test alone would decide between the outcomes left
            outcome = "cannot tell"
        else:
            outcome = "supported" if not failing else "partly supported"
    return {**tests, "passed": passed, "outcome": outcome}


def verdict_table(verdicts: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per aligner (the `verdict` of each, by run name): its outcome, whether each test passed, and the
    numbers the tests read."""
    return pd.DataFrame(
        [
            {"run": name, "outcome": v["outcome"], **{f"{test} passed": passed_text(ok) for test, ok in v["passed"].items()},
             **{key: value for key, value in v.items() if key not in ("outcome", "passed")}}
            for name, v in verdicts.items()
        ]
    )


def passed_text(ok: bool | None) -> str:
    """A test's result as the tables and the summary write it."""
    return "cannot tell" if ok is None else "yes" if ok else "NO"


def rule() -> str:
    """The verdict's rule in one sentence, with its thresholds: the caption of the report's verdict table."""
    return (
        f"Supported: all five tests pass (form gain >= {FORM_LEARNED:.0%}, content loss <= {CONTENT_TOLERANCE:.0%}, "
        f"loss of retrained and of centred base-trained knowledge probes each <= {PROBE_TOLERANCE:.0%}, a share >= "
        f"{WITHIN_NULL:.0%} of adapted layers within the covariance null); partly: the form learned and one other test "
        "failing; cannot tell: the geometry's positive control (a run that injects facts) passes the orthogonality "
        "test, and the outcome hangs on that test."
    )
