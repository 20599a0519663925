"""A run's output form is the one it records, never one guessed from its data: a recorded suite task gives its
form, a `probe train-demo` run its demo's, a user's --checker a /REGEX/ form, and anything else is unknown."""

from types import SimpleNamespace

import pytest

from probe.analyses import form_scores
from probe.dataset import form_named, knowledge_dataset, training_form


def run(task=None, data="runs/data/mine.jsonl", command="aligner train --data mine.jsonl"):
    training = {"config": {"data": data}, **({"task": task} if task else {})}
    return SimpleNamespace(provenance={"command": command, "training": training})


def test_a_run_recording_no_task_has_an_unknown_form_even_if_a_builtin_checker_passes_its_data(tmp_path):
    data = tmp_path / "ans.jsonl"
    data.write_text('{"prompt": "Capital of France?", "response": "<ans>Paris</ans>"}\n')  # terse would pass it
    assert training_form(run(data=str(data))) is None


@pytest.mark.parametrize(("task", "form"), [("json", "json"), ("bracket@elements", "bracket"), ("inject", None), ("value", None)])
def test_a_recorded_suite_task_gives_its_form_and_only_form_tasks_have_one(task, form):
    assert training_form(run(task)) == form


def test_a_demo_run_has_the_form_of_its_demo_task():
    command = "probe train-demo --runs runs --steps 40"
    assert training_form(run(data="runs/data/probe-demo-bracket-1tok.jsonl", command=command)) == "bracket"
    assert training_form(run(data="runs/data/probe-demo-value-1tok.jsonl", command=command)) is None
    assert training_form(run(data="runs/data/probe-demo-bracket-1tok.jsonl")) is None  # not trained by the demo


def test_a_users_checker_is_the_form_of_runs_recording_none_and_scores_answers():
    assert training_form(run(), checker="<ans>.+</ans>") == "/<ans>.+</ans>/"
    assert training_form(run("json"), checker="<ans>.+</ans>") == "json"  # the record comes first
    with pytest.raises(ValueError, match="not a valid regular expression"):
        training_form(run(), checker="<ans>(")
    dataset = knowledge_dataset("capitals", 2)
    scores = form_scores(["<ans>Paris</ans>", "Paris"] * 2, dataset, "/<ans>.+</ans>/")
    assert scores["form:/<ans>.+</ans>/"] == 0.5 and "form:json" in scores


def test_an_unknown_form_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no output form 'ans'"):
        form_named("ans")
