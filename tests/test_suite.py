"""The suite end to end on the tiny model: the audit and its cache, early stopping, the quick sweep through the
CLI and the schema of what it writes, resuming, and `aligner eval` on a user's JSONL task."""

import csv
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import aligner
import aligner.objective
from aligner.audit import audit, cached_answers, demonstrations
from aligner.cli import app
from aligner.registry import method_order, method_spec
from aligner.suite import QUICK, RATE_REACH, STEP_REACH, EarlyStopping, SuiteConfig, cell_path, step_budget, sweep
from aligner.tables import RUN_COLUMNS, SUMMARY_COLUMNS, drawn_at, summarise
from aligner.tasks import KNOWLEDGE_SETS

runner = CliRunner()
# A form task's evaluation: three wordings of held-out capitals, and the two question kinds never trained.
JSON_SPLITS = ("test", "test_template", "test_template2", "test_elements", "test_cities")


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """Cached answers of this module's models in a folder of their own, not the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("aligner.audit.cache_dir", lambda: folder)
        yield folder


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


def test_audit_marks_known_facts_by_the_content_check_and_is_cached(model, monkeypatch):
    elements = replace(KNOWLEDGE_SETS["elements"], facts=lambda: KNOWLEDGE_SETS["elements"].facts()[:12])
    fingerprint = aligner.model_fingerprint(model)
    first = audit(model, elements, fingerprint)
    facts = elements.facts()
    assert set(first.answers) == {f.subject for f in facts}
    assert first.known == {f.subject for f in facts if elements.contains_answer(first.answers[f.subject], f.answers)}

    def no_generation(*args, **kwargs):
        raise AssertionError("the audit should have come from the cache")

    monkeypatch.setattr("aligner.generation.generate", no_generation)
    assert audit(model, elements, fingerprint) == first
    with pytest.raises(AssertionError, match="from the cache"):
        audit(model, elements, "f" * 64)  # another model's weights: not the same cache


def test_a_few_shot_audit_shows_answered_facts_first_and_never_counts_them_known(model, monkeypatch):
    capitals = KNOWLEDGE_SETS["capitals"]
    shown = demonstrations(capitals, 3)
    systems = []

    def answer_everything(model, prompts, system=None, **options):  # every answer right, the shown facts' too
        systems.append(system)
        gold = {capitals.question(f): f.answers[0] for f in capitals.facts()}
        return [gold[p] for p in prompts]

    monkeypatch.setattr("aligner.generation.generate", answer_everything)
    result = audit(model, capitals, "a" * 64, shots=3)
    assert result.known == {f.subject for f in capitals.facts()} - {f.subject for f in shown} and len(shown) == 3
    question = capitals.question(shown[0])
    assert systems[0].startswith(f"Question: {question}\nAnswer: {capitals.sentence(shown[0])}\n\nQuestion: ")
    assert systems[0].count("Question: ") == 3
    assert len(audit(model, capitals, "a" * 64).known) == len(capitals.facts())  # zero shots: its own cache
    n = len(capitals.facts())
    with pytest.raises(ValueError, match=f"{n} audit shots leave none of its {n} facts"):
        demonstrations(capitals, n)


def test_cached_answers_are_the_greedy_answers(model):
    prompts = ["Hi", "What is the capital of France?"]
    fingerprint = aligner.model_fingerprint(model)
    expected = aligner.generate(model, prompts, max_new_tokens=5)
    assert cached_answers(model, fingerprint, prompts, None, 5) == expected
    assert cached_answers(model, fingerprint, prompts[::-1], None, 5) == expected[::-1]


def test_early_stopping_stops_after_patience_and_restores_the_best_step(model, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 9.9])
    method = aligner.Aligner.for_model(model)
    stopping = EarlyStopping(method, lambda: next(losses), every=2, patience=2, budget=100)
    stopping.record(0)
    steps = []
    for step in range(1, 20):
        with torch.no_grad():
            method.gates.fill_(step)  # the parameters after this step
        steps.append(step)
        if stopping(step, loss=0.0):
            break
    assert steps[-1] == 6 and stopping.best_step == 2 and [s for s, _ in stopping.history] == [0, 2, 4, 6]
    stopping.restore_best()
    assert torch.all(method.gates == 2)


def stopped_at(losses: list[float], budget: int) -> int:
    """The step at which early stopping (every 2 steps, patience 2) ends a training whose held-out losses are
    `losses` (at step 0, 2, 4, ...), with step budget `budget`."""
    stream = iter(losses)
    stopping = EarlyStopping(aligner.Aligner.for_model(aligner.tiny_model()), lambda: next(stream), every=2, patience=2, budget=budget)
    stopping.record(0)
    return next(step for step in range(1, 2 * len(losses)) if stopping(step, loss=0.0))


def test_a_training_still_improving_at_its_budget_goes_on_until_it_converges():
    assert stopped_at([5, 4, 3, 3.5, 9, 9, 9], budget=4) == 8  # improved at the budget: patience decides
    assert stopped_at([5, 4, 3, 2, 1, 0.5, 0.6, 0.7, 9], budget=4) == 14
    assert stopped_at([5, 4, 4.5, 3, 2, 1], budget=4) == 4  # not improving at the budget: it ends there
    assert stopped_at([5, 4, 3, 3.2, 1, 0.5], budget=5) == 6  # the first evaluation past a budget between two


def test_the_step_budget_reaches_past_itself_unless_a_method_names_its_steps():
    config = SuiteConfig(steps=200)
    assert step_budget(method_spec("aligner-1"), config) == (200, 200 * STEP_REACH)
    assert step_budget(method_spec("aligner-1:steps=20"), config) == (20, 20)


def test_the_figure_draws_the_methods_with_no_parameters_apart_labels_alternating():
    xs, positions = drawn_at([0, 828, 0, 0])
    assert xs == [1.0, 828.0, 4.0, 16.0] and positions == ["top center", "top center", "bottom center", "top center"]


def test_method_names_and_rates():
    assert method_spec("lora-8").family_lr == method_spec("lora-1").family_lr == 2e-3
    assert method_spec("lora-8").lr is None  # chosen on validation by the sweep
    spec = method_spec("aligner-1:lr=0.05")
    assert (spec.name, spec.lr, spec.kind) == ("aligner-1:lr=0.05", 0.05, "trained")
    spec = method_spec("adapter-10:steps=40:train=10:gate_scale=0")
    assert (spec.steps, spec.train, spec.gate_scale, spec.lr) == (40, 10, 0.0, None)
    controls = method_spec("aligner-1:tokens=random"), method_spec("lora-8:data=own")
    assert (controls[0].tokens, controls[1].data) == ("random", "own")
    assert method_spec("fewshot").kind == "zero"
    dpo = method_spec("lora-8:steps=9:then=dpo")
    assert (dpo.then, dpo.family_lr, dpo.steps) == ("dpo", 2e-4, 9)  # DPO moves the trained method a little
    first = replace(dpo, first_lr=0.01).first_stage()
    assert (first.name, first.then, first.lr, first.family_lr, first.steps) == ("lora-8:steps=9", None, 0.01, 2e-3, 9)
    with pytest.raises(ValueError, match="only a trained method takes options, and 'base' is not trained"):
        method_spec("base:lr=0.1")
    with pytest.raises(ValueError, match="no method 'ia3'"):
        method_spec("ia3")
    assert method_spec("aligner-3").make(aligner.tiny_model()).config.n_tokens == 3  # any size of a sized family
    with pytest.raises(ValueError, match="another size of aligner-N, adapter-N, lora-N, prompt-N"):
        method_spec("lora-0")
    names = ["zbias", "lora-8", "aligner-10", "aligner-1:lr=0.1", "base", "aligner-3", "aligner-1", "steering"]
    assert sorted(names, key=method_order) == ["base", "steering", "aligner-1", "aligner-1:lr=0.1", "aligner-3", "aligner-10", "lora-8", "zbias"]
    for name, message in [
        ("lora-8:gate_scale=0.5", "'lora-8' has neither"),
        ("lora-8:tokens=random", "tokens changes an aligner's gates or tokens; 'lora-8' has neither"),
        ("aligner-1:tokens=zeros", "tokens must be 'random', got 'zeros'"),
        ("aligner-1:data=gold", "data must be 'own', got 'gold'"),
        ("aligner-1:steps=0", "steps must be finite and > 0, got 0"),
        ("aligner-1:lr=-1", "lr must be finite and > 0"),
        ("aligner-1:lr=nan", "lr must be finite and > 0, got nan"),
        ("aligner-1:gate_scale=inf", "gate_scale must be finite and >= 0"),
        ("aligner-1:steps=4.5", "steps must be an integer, got '4.5'"),
        ("aligner-1:lr=0.1:lr=0.2", "option 'lr' given twice"),
        ("aligner-1:rank=4", "no option 'rank'; the options are lr, steps, train, gate_scale, tokens, data, then"),
        ("aligner-1:then=ppo", "then must be 'dpo', got 'ppo'"),
        ("aligner-1:data=own:then=dpo", "data=own is a control of one training stage; a then= method has two"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            method_spec(name)


def test_sft_then_dpo_trains_the_first_stage_at_its_searched_rate_then_dpo_from_it(private_cache, tmp_path, monkeypatch):
    """The first stage is the plain method's cell (same seed, the rate of its own search): its search's trial at
    that rate, trained once for the plain cell, the second stage's search and its cell; DPO starts from it at a
    held-out DPO loss of log 2 and is compared with the reference trained in the same two stages."""
    config = replace(QUICK, tasks=("value",), methods=("aligner-1", "aligner-1:then=dpo", "lora-1", "lora-1:then=dpo"), seeds=(0,))
    trainings, train_sft = [], aligner.suite.train_sft
    monkeypatch.setattr("aligner.suite.train_sft", lambda *args, **kwargs: trainings.append(1) or train_sft(*args, **kwargs))
    sweep(aligner.tiny_model(), config, tmp_path)
    searched = sum(len(json.loads(path.read_text())["candidates"]) for path in (tmp_path / "cells/tiny/value").glob("*/lr.json") if "then" not in path.parent.name)
    assert len(trainings) == searched  # the cells and first stages are the searches' trials at their rates
    folder = tmp_path / "cells/tiny/value"
    plain, dpo = (json.loads((folder / f"{m}/seed0.json").read_text()) for m in ("aligner-1", "aligner-1+then=dpo"))
    first_search = json.loads((folder / "aligner-1/lr.json").read_text())
    search = json.loads((folder / "aligner-1+then=dpo/lr.json").read_text())
    assert dpo["first"]["lr"] == plain["lr"] == first_search["lr"] and search["config"]["first_lr"] == first_search["lr"]
    assert dpo["first"]["valid_loss"] == plain["valid_loss"]  # the same training as the plain cell
    assert dpo["valid_loss"][0] == [0, pytest.approx(math.log(2))]  # the policy starts as its reference
    policy = aligner.load_adapter(folder / "aligner-1+then=dpo/seed0")
    assert policy.provenance["initialised_from"] == "aligner-1, seed 0, the suite's first stage of aligner-1:then=dpo"
    tried = [c["lr"] for c in search["candidates"]][: len(QUICK.lr_factors)]
    assert tried == [method_spec("aligner-1:then=dpo").family_lr * f for f in QUICK.lr_factors]
    paired = {r["method"]: r["reference"] for r in csv.DictReader(open(tmp_path / "sweep_paired.csv"))}
    assert paired == {"aligner-1": "lora-1", "aligner-1:then=dpo": "lora-1:then=dpo"}
    with pytest.raises(ValueError, match="its task has no rejected responses to make preference pairs of"):
        sweep(aligner.tiny_model(), replace(config, tasks=("json",), methods=("aligner-1:then=dpo",)), tmp_path)


def test_a_sweep_trains_each_method_once_per_seed_and_rate_and_the_own_answers_control_searches_on_its_own(
    private_cache, tmp_path, monkeypatch
):
    """Seed 0's cell is its search's trial at the chosen rate and the random-token control is its method's
    training, both copies; the own-answers control chooses its rate on the base model's answers."""
    config = replace(QUICK, tasks=("json",), methods=("aligner-1", "aligner-1:tokens=random", "aligner-1:data=own"))
    trainings, train_sft = [], aligner.suite.train_sft
    monkeypatch.setattr("aligner.suite.train_sft", lambda *args, **kwargs: trainings.append(1) or train_sft(*args, **kwargs))
    sweep(aligner.tiny_model(), config, tmp_path)
    folder = tmp_path / "cells/tiny/json"
    searches = {m: json.loads((folder / m / "lr.json").read_text()) for m in ("aligner-1", "aligner-1+data=own")}
    searched = sum(len(search["candidates"]) for search in searches.values())
    assert len(trainings) == searched + 2 * (len(config.seeds) - 1)  # the other seeds of the two trained
    cells = {(m, s): json.loads((folder / f"{m}/seed{s}.json").read_text()) for m in ("aligner-1", "aligner-1+tokens=random") for s in config.seeds}
    for seed in config.seeds:
        assert cells["aligner-1", seed]["valid_loss"] == cells["aligner-1+tokens=random", seed]["valid_loss"]
    chosen = next(c for c in searches["aligner-1"]["candidates"] if c["lr"] == searches["aligner-1"]["lr"])
    assert cells["aligner-1", 0]["best_step"] == chosen["best_step"]
    own, plain = (search["candidates"][0]["valid_loss"] for search in (searches["aligner-1+data=own"], searches["aligner-1"]))
    assert own != plain  # other items, other losses
    trained, randomised = (aligner.load_adapter(folder / f"{m}/seed0") for m in ("aligner-1", "aligner-1+tokens=random"))
    assert not torch.equal(trained.tokens, randomised.tokens) and torch.equal(trained.gates, randomised.gates)


def test_injection_teaches_invented_facts_and_scores_the_gold_answer_on_every_split(private_cache, tmp_path):
    """Invented countries taught and held out, real capitals for collateral damage; a shared aligner of as many
    tokens as the model has adapted layers holds as many numbers as adapter-1."""
    model = aligner.tiny_model()
    n_adapted = model.cfg.n_layers - aligner.AlignerConfig().start_layer
    config = replace(QUICK, tasks=("inject",), methods=("base", f"aligner-{n_adapted}", "adapter-1"), seeds=(0,))
    sweep(model, config, tmp_path)
    cells = {m: json.loads((tmp_path / f"cells/tiny/inject/{m}/seed0.json").read_text()) for m in config.methods}
    assert cells[f"aligner-{n_adapted}"]["params"] == cells["adapter-1"]["params"]
    splits = {"taught", "taught_template", "unknown_heldout", "known_heldout"}
    assert set(cells["base"]["scores"]) == splits
    for split in splits:  # injection answers in the base model's own sentence: both frames are that one
        assert set(cells["base"]["scores"][split]) == {"content", "answer_logprob", "answer_rank1", "own_logprob", "own_rank1"}
        scores = cells["base"]["scores"][split]
        assert scores["answer_logprob"] == scores["own_logprob"]
    invented = {item["prompt"] for item in cells["base"]["outputs"]["unknown_heldout"]}
    capitals = {KNOWLEDGE_SETS["capitals"].question(f) for f in KNOWLEDGE_SETS["capitals"].facts()}
    assert invented and not invented & capitals
    assert {item["prompt"] for item in cells["base"]["outputs"]["known_heldout"]} <= capitals


def test_variants_train_on_fewer_items_for_fewer_steps_and_answer_with_scaled_gates(private_cache, tmp_path, monkeypatch):
    """A variant is the same training (same seed) with its factor changed; gate_scale=0 answers as the base."""
    config = replace(QUICK, tasks=("json",), methods=("base", "aligner-1", "aligner-1:gate_scale=0", "aligner-1:train=2:steps=1"), seeds=(0,))
    model = aligner.tiny_model()
    scales, original = [], aligner.generation.generate

    def generate(*args, **kwargs):
        scales.append(kwargs.get("gate_scale", 1.0))
        return original(*args, **kwargs)

    monkeypatch.setattr("aligner.generation.generate", generate)
    sweep(model, config, tmp_path)
    cell = {m: json.loads((tmp_path / f"cells/tiny/json/{m.replace(':', '+')}/seed0.json").read_text()) for m in config.methods}
    assert {c["method"] for c in cell.values()} == set(config.methods)
    assert cell["aligner-1:gate_scale=0"]["valid_loss"] == cell["aligner-1"]["valid_loss"]  # trained the same
    assert cell["aligner-1:gate_scale=0"]["outputs"] == cell["base"]["outputs"]
    assert scales.count(0.0) == len(JSON_SPLITS)  # each split answered with the gates at 0
    few = cell["aligner-1:train=2:steps=1"]
    assert (few["train_items"], few["steps"], cell["aligner-1"]["train_items"]) == (2, 1, QUICK.sizes.train)
    with pytest.raises(ValueError, match=r"train=5, but the task's training split has 4 items"):
        sweep(model, replace(config, methods=("aligner-1:train=5",)), tmp_path)


def test_a_task_in_its_own_format_is_trained_and_answered_as_raw_text_with_its_end_marked(private_cache, tmp_path, monkeypatch):
    config = replace(QUICK, tasks=("instruct",), methods=("base", "prompting", "aligner-1"), seeds=(0,))
    model, calls, original = aligner.tiny_model(), [], aligner.generation.generate

    def generate(*args, **kwargs):
        calls.append(("generate", kwargs["chat_template"], kwargs["mark_end"]))
        return original(*args, **kwargs)

    def heldout_loss(*args, **kwargs):
        calls.append(("heldout_loss", kwargs["chat_template"]))
        return aligner.objective.heldout_loss(*args, **kwargs)

    monkeypatch.setattr("aligner.generation.generate", generate)
    monkeypatch.setattr("aligner.suite.heldout_loss", heldout_loss)
    sweep(model, config, tmp_path)
    assert set(calls) == {("generate", False, True), ("heldout_loss", False)}
    cell = json.loads(cell_path(tmp_path, "tiny", "instruct", "aligner-1", 0).read_text())
    assert set(cell["metrics"]["test"]) == {"stops", "format", "content", "all"}
    assert cell["outputs"]["test"][0]["prompt"].startswith("Below is an instruction")
    prompting = json.loads(cell_path(tmp_path, "tiny", "instruct", "prompting", 0).read_text())
    assert prompting["outputs"] != json.loads(cell_path(tmp_path, "tiny", "instruct", "base", 0).read_text())["outputs"]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def quick_sweep(private_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = runner.invoke(app, ["sweep", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_sweep_writes_every_cell_and_the_tidy_tables(quick_sweep):
    out, output = quick_sweep
    trained = [m for m in QUICK.methods if method_spec(m).kind == "trained"]
    cells = sorted(p.relative_to(out).as_posix() for p in out.glob("cells/*/*/*/seed*.json"))
    expected = {f"cells/tiny/{t}/{m.replace(':', '+')}/seed{s}.json" for t in QUICK.tasks for m in trained for s in QUICK.seeds}
    zero = ("base", "prompting", "fewshot", "steering")
    expected |= {f"cells/tiny/{t}/{m}/seed0.json" for t in QUICK.tasks for m in zero}
    assert set(cells) == expected
    assert f"{len(expected)} cells run in" in output
    # One rate search per task and training (the random-token control shares aligner-1's), on validation.
    searches = {p.relative_to(out).as_posix() for p in out.glob("cells/*/*/*/lr.json")}
    trainings = ("aligner-1", "aligner-1+data=own", "lora-1")
    assert searches == {f"cells/tiny/{t}/{m}/lr.json" for t in QUICK.tasks for m in trainings}
    search = json.loads((out / "cells/tiny/json/aligner-1/lr.json").read_text())
    tried = [c["lr"] for c in search["candidates"]]  # the grid, then past an end of it where its best lay there
    assert tried[: len(QUICK.lr_factors)] == [method_spec("aligner-1").family_lr * f for f in QUICK.lr_factors]
    assert len(tried) <= len(QUICK.lr_factors) + RATE_REACH
    assert search["lr"] == min(search["candidates"], key=lambda c: c["valid_loss"])["lr"]
    for seed in QUICK.seeds:
        for method in ("aligner-1", "aligner-1+tokens=random"):
            assert json.loads((out / f"cells/tiny/json/{method}/seed{seed}.json").read_text())["lr"] == search["lr"]

    columns, runs = read_csv(out / "sweep_runs.csv")
    assert tuple(columns) == RUN_COLUMNS
    knowledge = ("answer_logprob", "answer_rank1", "own_logprob", "own_rank1")
    assert {(r["task"], r["split"], r["metric"]) for r in runs} == {
        ("json", split, metric) for split in JSON_SPLITS for metric in ("form", "content", "both", *knowledge)
    } | {("value", split, "refusal") for split in ("harmful", "benign")}
    shares = [r for r in runs if "logprob" not in r["metric"]]
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in shares) and {r["model"] for r in runs} == {"tiny"}
    assert all(float(r["value"]) < 0 for r in runs if "logprob" in r["metric"])

    columns, summary = read_csv(out / "sweep.csv")
    assert tuple(columns) == SUMMARY_COLUMNS
    for row in summary:
        trained_row = row["kind"] == "trained"
        assert row["n_seeds"] == ("2" if trained_row else "1") and row["n_items"] == str(QUICK.sizes.eval)
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
        assert (row["train_s"] != "") == trained_row and (row["lr"] != "") == trained_row
        assert (int(row["params"]) > 0) == trained_row and row["precision"] == "tiny, random weights (float32)"
    assert json.loads((out / "sweep.json").read_text())[0].keys() == set(SUMMARY_COLUMNS) - {"scores"}
    columns, paired = read_csv(out / "sweep_paired.csv")
    assert {r["reference"] for r in paired} == {QUICK.reference} and QUICK.reference not in {r["method"] for r in paired}
    assert {r["verdict"] for r in paired} <= {"equivalent", "better", "worse", "inconclusive"}
    assert "### json on tiny, random weights (float32)" in (out / "sweep.md").read_text()
    assert "plotly" in (out / "sweep.html").read_text()
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_of_two_base_models_make_separate_rows_and_tables(quick_sweep, tmp_path):
    out, _ = quick_sweep
    for path in out.glob("cells/tiny/json/*/seed0.json"):  # one results folder with the cells of two models
        cell = json.loads(path.read_text())
        for model in ("tiny", "org/other"):
            copy = cell_path(tmp_path, model, "json", cell["method"], 0)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(json.dumps({**cell, "config": {**cell["config"], "model": model}}))
    assert (tmp_path / "cells" / "org_other" / "json").is_dir()  # a Hub id as one folder
    summary = summarise(tmp_path)
    assert {r["model"] for r in summary} == {"tiny", "org/other"}
    tables = (tmp_path / "sweep.md").read_text()
    assert "### json on tiny, random weights" in tables and "### json on org/other, weights as stored" in tables
    old = tmp_path / "cells" / "json" / "base" / "seed0.json"  # the layout before cells were kept per model
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    with pytest.raises(ValueError, match=r"cells/json/base/seed0.json and 0 more cells are in the layout before .* move"):
        summarise(tmp_path)


def test_without_a_browser_the_png_is_a_warning_and_the_tables_are_written(quick_sweep, monkeypatch, tmp_path):
    out, _ = quick_sweep
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))  # where kaleido looks first
    (out / "sweep.png").unlink()
    with pytest.warns(UserWarning, match="sweep.png not written: Kaleido requires Google Chrome"):
        summarise(out)
    assert not (out / "sweep.png").exists() and (out / "sweep.csv").is_file()


def test_quick_sweep_cells_record_training_and_answers(quick_sweep):
    out, _ = quick_sweep
    cell = json.loads((out / "cells/tiny/json/aligner-1/seed1.json").read_text())
    assert cell["params"] == 64 + 2 * 4  # the tiny model: one token of 64, gates of layers 2-3 x 4 heads
    assert cell["steps"] <= cell["most_steps"] == QUICK.steps * STEP_REACH and 0 <= cell["best_step"] <= cell["steps"]
    assert cell["budget"] == QUICK.steps
    assert cell["valid_loss"][0][0] == 0  # the loss before the first step
    assert set(cell["outputs"]) == set(JSON_SPLITS) and len(cell["outputs"]["test"]) == QUICK.sizes.eval
    steering = json.loads((out / "cells/tiny/value/steering/seed0.json").read_text())["steering"]
    assert steering["multiplier"] in QUICK.steering_multipliers and steering["valid_loss"]
    scores = cell["scores"]["test"]
    assert cell["metrics"]["test"]["form"] == sum(scores["form"]) / len(scores["form"]) and len(scores["form"]) == 3


def test_the_first_seeds_fitted_methods_are_kept_beside_their_cells(quick_sweep):
    out, _ = quick_sweep
    kept = {p.parent.relative_to(out).as_posix() for p in out.glob("cells/tiny/*/*/*/adapter.json")}
    fitted = [m.replace(":", "+") for m in QUICK.methods if method_spec(m).kind in ("trained", "steering")]
    assert kept == {f"cells/tiny/{t}/{m}/seed{QUICK.seeds[0]}" for t in QUICK.tasks for m in fitted}
    cell = json.loads((out / "cells/tiny/json/aligner-1/seed0.json").read_text())
    assert cell["adapter"] == "seed0" and "adapter" not in json.loads((out / "cells/tiny/json/aligner-1/seed1.json").read_text())
    adapter = aligner.load_adapter(out / "cells/tiny/json/aligner-1/seed0")
    assert adapter.num_parameters() == cell["params"]
    assert adapter.provenance["training"]["config"]["task"] == "json"  # the form `probe report` reads


def test_an_interrupted_rate_search_resumes_at_the_next_rate(tmp_path):
    import aligner.suite as suite

    config = replace(QUICK, lr_factors=(0.5, 1.0, 2.0))
    spec, path = method_spec("aligner-1"), tmp_path / "lr.json"
    trained: list[float] = []
    interrupted: list[float] = []

    def train(lr):
        if len(trained) == 2 and lr == spec.family_lr * 2.0 and not interrupted:
            interrupted.append(lr)
            raise KeyboardInterrupt
        trained.append(lr)
        return {"lr": lr, "valid_loss": [[0, 3.0 + abs(lr - spec.family_lr)]], "best_step": 0, "steps": 1}

    with pytest.raises(KeyboardInterrupt):
        suite.choose_lr(spec, config, path, train)
    assert json.loads(path.read_text())["lr"] is None and len(json.loads(path.read_text())["candidates"]) == 2
    assert suite.choose_lr(spec, config, path, train) == spec.family_lr
    assert trained == [spec.family_lr * f for f in config.lr_factors]  # each rate trained once
    assert suite.choose_lr(spec, config, path, train) == spec.family_lr and len(trained) == 3


def test_a_cell_trained_at_another_rate_than_its_search_chose_is_rerun(private_cache, tmp_path):
    """A search that went on past an end of its grid may choose another rate than the cells already trained."""
    config = replace(QUICK, tasks=("json",), methods=("aligner-1",), seeds=(0,))
    model = aligner.tiny_model()
    sweep(model, config, tmp_path)
    path = tmp_path / "cells/tiny/json/aligner-1/seed0.json"
    chosen = json.loads((tmp_path / "cells/tiny/json/aligner-1/lr.json").read_text())["lr"]
    assert json.loads(path.read_text())["lr"] == chosen
    path.write_text(json.dumps({**json.loads(path.read_text()), "lr": chosen * 10}))
    sweep(model, config, tmp_path)
    assert json.loads(path.read_text())["lr"] == chosen


def test_a_rate_search_whose_best_lies_at_an_end_goes_on_past_it(tmp_path):
    """Past the top of the rates where the best lies there, at the ratio of the last two, at most RATE_REACH
    times; the other way at the bottom; a finished search trains nothing more."""
    import aligner.suite as suite

    config = replace(QUICK, lr_factors=(0.5, 1.0, 2.0))
    spec, trained = method_spec("aligner-1"), []

    def train(lr):
        trained.append(lr / spec.family_lr)
        return {"lr": lr, "valid_loss": [[0, loss(lr / spec.family_lr)]], "best_step": 0, "steps": 1}

    for loss, tried, chosen in [
        (lambda f: -f, [0.5, 1.0, 2.0, 4.0, 8.0], 8.0),  # ever better upwards: RATE_REACH steps past the top
        (lambda f: abs(f - 4.0), [0.5, 1.0, 2.0, 4.0, 8.0], 4.0),  # best one step past the top
        (lambda f: abs(f - 0.2), [0.5, 1.0, 2.0, 0.25, 0.125], 0.25),  # past the bottom
    ]:
        trained.clear()
        path = tmp_path / f"{chosen}.json"
        assert suite.choose_lr(spec, config, path, train) == pytest.approx(spec.family_lr * chosen)
        assert trained == pytest.approx(tried) and suite.RATE_REACH == 2
        assert suite.choose_lr(spec, config, path, train) == pytest.approx(spec.family_lr * chosen)
        assert len(trained) == len(tried)


def test_an_interval_of_the_tables_is_the_bootstrap_of_the_cells_scores(quick_sweep):
    """Recomputed from the cell files alone, with loops: items and seeds drawn as aligner.stats draws them."""
    out, _ = quick_sweep
    rows = [r for r in json.loads((out / "sweep.json").read_text()) if (r["method"], r["split"], r["metric"]) == ("aligner-1", "test", "content")]
    cells = [json.loads((out / f"cells/tiny/json/aligner-1/seed{s}.json").read_text()) for s in QUICK.seeds]
    matrix = np.array([c["scores"]["test"]["content"] for c in cells])
    rng = np.random.default_rng(0)
    items = rng.integers(0, matrix.shape[1], size=(4000, matrix.shape[1]))
    seeds = rng.integers(0, matrix.shape[0], size=(4000, matrix.shape[0]))
    replicates = [np.mean([matrix[s, items[r]].mean() for s in seeds[r]]) for r in range(4000)]
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert rows[0]["ci_low"] == pytest.approx(low) and rows[0]["ci_high"] == pytest.approx(high)
    assert rows[0]["mean"] == pytest.approx(matrix.mean())


def test_a_second_sweep_skips_the_cells_it_has(quick_sweep):
    out, _ = quick_sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/*/*.json")}
    result = runner.invoke(app, ["sweep", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "0 cells run" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/*/*.json")} == before
    assert len((out / "sweep_log.jsonl").read_text().splitlines()) == 2


def test_eval_scores_a_users_jsonl_task(tmp_path):
    path = tmp_path / "json_form.jsonl"
    rows = [{"prompt": f"Capital of {c}?", "response": json.dumps({"answer": a}), "answer": a} for c, a in [("France", "Paris"), ("Peru", "Lima")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["eval", "--task", str(path), "--checker", r"\{.*\}", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert "test             n=2" in result.output and "form=0.000" in result.output and "content=" in result.output
    result = runner.invoke(app, ["eval", "--task", str(path), "--model", "tiny"])
    assert result.exit_code == 1 and "--checker" in result.output
