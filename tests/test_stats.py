"""aligner.stats against scipy's bootstrap and by hand; the suite's controls and the gold answer under teacher
forcing (aligner.recall) on the tiny model."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

import aligner
from aligner.recall import Framed, answer_scores, answer_span
from aligner.stats import Estimate, bootstrap, compare, paired_difference
from aligner.suite import randomise_tokens
from aligner.tasks import Sizes


def test_one_seed_interval_agrees_with_scipys_percentile_bootstrap():
    scores = np.random.default_rng(1).integers(0, 2, size=48).astype(float)
    ours = bootstrap(scores, resamples=20000)
    theirs = scipy_stats.bootstrap((scores,), np.mean, n_resamples=20000, method="percentile", random_state=2)
    assert ours.mean == pytest.approx(scores.mean())
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.02)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.02)


def test_seeds_that_disagree_widen_the_interval():
    items = np.random.default_rng(3).integers(0, 2, size=40).astype(float)
    alike = bootstrap([items, items, items])
    apart = bootstrap([items, np.ones(40), np.zeros(40)])
    assert apart.high - apart.low > alike.high - alike.low


def test_a_paired_difference_cancels_what_both_methods_share():
    rng = np.random.default_rng(4)
    easy = rng.random(60) < 0.5  # items both methods get right
    a = np.where(easy, 1.0, rng.random(60) < 0.2)
    b = a.copy()
    b[:3] = 0  # b misses three items that a gets
    paired = paired_difference([a], [b])
    assert paired.mean == pytest.approx(a.mean() - b.mean())
    assert paired.low >= 0  # every replicate draws the same items for both: never below 0
    unpaired_width = bootstrap(a).high - bootstrap(a).low
    assert paired.high - paired.low < unpaired_width
    assert paired_difference([a], [a]) == Estimate(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="the same items: 60 against 59"):
        paired_difference([a], [b[:59]])


@pytest.mark.parametrize(
    "low, high, verdict",
    [(-0.04, 0.03, "equivalent"), (0.01, 0.2, "better"), (-0.3, -0.02, "worse"), (-0.1, 0.2, "inconclusive"), (0.01, 0.04, "equivalent")],
)
def test_a_difference_is_read_against_the_margin(low, high, verdict):
    assert compare(Estimate((low + high) / 2, low, high), margin=0.05) == verdict


def test_random_tokens_keep_each_tokens_norm_and_the_gates():
    model = aligner.tiny_model()
    torch.manual_seed(0)
    al = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=3))
    with torch.no_grad():
        al.gates.normal_()
    tokens, gates = al.tokens.clone(), al.gates.clone()
    randomise_tokens(al, seed=0)
    torch.testing.assert_close(al.tokens.norm(dim=-1), tokens.norm(dim=-1))
    assert torch.equal(al.gates, gates)
    cosines = torch.nn.functional.cosine_similarity(al.tokens, tokens, dim=-1)
    assert cosines.abs().max() < 0.5  # not the directions the same seed initialised them with
    again = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=3))
    with torch.no_grad():
        again.tokens.copy_(tokens)
    randomise_tokens(again, seed=0)
    assert torch.equal(again.tokens, al.tokens)  # seeded


def test_knowledge_scores_read_each_items_own_frames():
    from aligner.recall import gold_as_written, knowledge_scores
    from aligner.tasks import get_task

    items = get_task("caps").build(None, Sizes(train=1, valid=1, eval=2)).eval["test"]
    assert gold_as_written(items[0], items[0].frame, "answer") == items[0].answers[0].upper()
    assert gold_as_written(items[0], items[0].own_frame, "own") == items[0].answers[0]
    scores = knowledge_scores(aligner.tiny_model(), None, items)
    assert set(scores) == {"answer_logprob", "answer_rank1", "own_logprob", "own_rank1"}
    assert all(len(values) == 2 for values in scores.values())
    assert knowledge_scores(aligner.tiny_model(), None, get_task("value").build(None, Sizes(2, 1, 2)).eval["harmful"]) == {}


def test_answer_scores_read_the_answers_tokens_as_the_whole_response_tokenises_them():
    model = aligner.tiny_model()
    tokenizer = model.tokenizer
    text = '{"answer": "Paris"}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    first, last = answer_span(tokenizer, ids, '{"answer": "', "Paris")
    assert tokenizer.decode(ids[first : last + 1]).endswith("Paris") and len(tokenizer.decode(ids[:first])) <= 12
    items = [Framed("What is the capital of France?", '{"answer": "', "Paris"), Framed("Capital of Chad?", "", "N'Djamena")]
    scores = answer_scores(model, None, items)
    assert set(scores) == {"answer_logprob", "answer_rank1"} and all(len(v) == 2 for v in scores.values())
    assert all(v < 0 for v in scores["answer_logprob"]) and set(scores["answer_rank1"]) <= {0.0, 1.0}
    # Zero gates: an aligner attached reads the same numbers as the base model.
    with_aligner = answer_scores(model, aligner.Aligner.for_model(model), items)
    assert with_aligner["answer_logprob"] == pytest.approx(scores["answer_logprob"], abs=1e-4)


def test_the_own_answers_control_trains_on_the_base_models_answers(monkeypatch):
    from aligner.suite import QUICK, data_sha256, fewshot_system, own_answers
    from aligner.tasks import get_task

    task = get_task("json")
    data = task.build(None, QUICK.sizes)
    monkeypatch.setattr("aligner.suite.cached_answers", lambda model, fp, prompts, *args: [f"own {p}" for p in prompts])
    own = own_answers(None, "f" * 64, task, data.train, QUICK)
    assert [i.response for i in own] == [f"own {i.prompt}" for i in data.train]
    assert [i.prompt for i in own] == [i.prompt for i in data.train] and own[0].answers == data.train[0].answers
    shown = fewshot_system(data.train, 2, None)
    assert shown.count("Question: ") == 2 and data.train[1].response in shown and data.train[2].response not in shown
    assert fewshot_system([], 2, None) is None
    assert data_sha256(data) == data_sha256(task.build(None, QUICK.sizes)) != data_sha256(replace(data, train=own))


def test_the_steering_grid_goes_on_past_the_end_where_its_best_lies(monkeypatch):
    """A held-out loss that falls with the multiplier up to 10: the grid (1, 2) doubles on to 16, where the loss
    rises again, and the best (8) is found inside the grid, not at its end."""
    from aligner.baselines import fit_steering
    from aligner.tasks import get_task

    model = aligner.tiny_model()
    data = get_task("json").build(None, Sizes(train=4, valid=2, eval=1))
    tried = []

    def attached_config(self, model):  # record the multiplier each held-out loss is measured at
        tried.append(self.config.multiplier)
        return contextlib.nullcontext()

    monkeypatch.setattr("aligner.baselines.heldout_loss", lambda model, examples, system=None: abs(tried[-1] - 10.0))
    monkeypatch.setattr("aligner.methods.SteeringVector.attached", attached_config)
    steering, losses = fit_steering(model, data.train, data.valid, [1], [1.0, 2.0], reach=4)
    assert sorted(set(tried)) == [1.0, 2.0, 4.0, 8.0, 16.0] and len(losses) == 5
    assert steering.config.multiplier == 8.0
    capped, _ = fit_steering(model, data.train, data.valid, [1], [1.0, 2.0], reach=1)
    assert capped.config.multiplier == 4.0  # one step past the end, and no further
