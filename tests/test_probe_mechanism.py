"""The mechanism analyses on a tiny random model: the logit lens, the prefix's direct logit attribution, the layer
dissociation and URIAL's token shift, each pinned by a case whose answer is known without the code under test."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import aligner
from aligner.chat import example_ids
from aligner.methods import LoRA, LoRAConfig, SteeringConfig, SteeringVector, ZBias, ZBiasConfig
from aligner.model import projection
from aligner.recall import Framed, answer_scores, answer_span
from aligner.tasks import Sizes, frame_of, get_task, own_frame_of
from probe.dissociation import layer_dissociation
from probe.lens import answer_in_form, logit_lens, readable_from, token_readout
from probe.mechanism_figures import (
    layer_dissociation_figure,
    logit_lens_figure,
    token_readout_figure,
    token_shift_figure,
)
from probe.shift import most_shifted, shift_shares, token_shift

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


@pytest.fixture(scope="module")
def items():
    return get_task("json").build(None, Sizes(train=1, valid=1, eval=3)).eval["test"]


def random_aligner(model, start_layer=1, n_tokens=2, only_layer=None, seed=0):
    """An aligner with random tokens and gates (all adapted layers', or `only_layer`'s alone)."""
    torch.manual_seed(seed)
    al = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=n_tokens, start_layer=start_layer))
    with torch.no_grad():
        al.gates.normal_()
        if only_layer is not None:
            keep = torch.zeros_like(al.gates)
            keep[only_layer - start_layer] = 1
            al.gates.mul_(keep)
    return al


def answer_position(model, prompt, frame, answer):
    """The ids of prompt + frame + answer and the position that predicts the answer's first token."""
    ids, n_prompt = example_ids(model.tokenizer, prompt, frame + answer)
    first, _ = answer_span(model.tokenizer, ids[n_prompt:-1], frame, answer)
    return ids, n_prompt + first - 1


def own_logprob(model, prompt, frame, answer):
    """log p(answer's first token | prompt, frame) from the model's own logits, and that token's rank."""
    ids, position = answer_position(model, prompt, frame, answer)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids])).float()[0, position], dim=-1)
    gold = ids[position + 1]
    return float(logprobs[gold]), int((logprobs > logprobs[gold]).sum()) + 1


def test_the_logit_lens_at_the_last_layer_is_the_models_own_log_probability(model, items):
    al = random_aligner(model)
    lens = logit_lens(model, al, items, batch_size=2)
    last = lens[lens["layer"] == model.cfg.n_layers - 1]
    assert len(lens) == 3 * len(items) * model.cfg.n_layers
    for i, item in enumerate(items):
        expected = {
            "base_own": own_logprob(model, item.prompt, own_frame_of(item), item.answers[0]),
            "base_frame": own_logprob(model, item.prompt, frame_of(item), answer_in_form(item)),
        }
        with al.attached(model):
            expected["aligned"] = own_logprob(model, item.prompt, frame_of(item), answer_in_form(item))
        for condition, (logprob, rank) in expected.items():
            row = last[(last["condition"] == condition) & (last["item"] == i)].iloc[0]
            assert row["logprob"] == pytest.approx(logprob, abs=1e-4)
            assert row["rank"] == rank
    assert lens.loc[lens["condition"] == "aligned", "logprob"].to_numpy() != pytest.approx(
        lens.loc[lens["condition"] == "base_frame", "logprob"].to_numpy()
    )


def test_readable_from_is_the_first_layer_after_which_the_answer_stays_on_top():
    ranks = {0: [5, 1, 3, 1, 1], 1: [1, 1, 1, 1, 1], 2: [1, 1, 1, 1, 2]}
    lens = pd.DataFrame(
        [{"condition": "c", "item": i, "layer": layer, "rank": r} for i, rs in ranks.items() for layer, r in enumerate(rs)]
    )
    found = readable_from(lens).set_index("item")["layer"]
    assert found[0] == 3 and found[1] == 0 and np.isnan(found[2])


def test_a_prefix_that_writes_one_tokens_unembedding_promotes_that_token(model, items):
    # Four key/value heads of 16 make V_p as wide as d_model: P can be solved for any contribution.
    full = aligner.tiny_model(n_kv_heads=4)
    last = full.cfg.n_layers - 1
    al = aligner.Aligner.for_model(full, aligner.AlignerConfig(n_tokens=1, start_layer=last - 1))
    target = 1234
    with torch.no_grad():
        al.gates[1] = 1.0  # the last layer writes; the one before has its gates at zero
        w_o = projection(full.blocks[last].attn.o).weight  # (d_model, H * d_head)
        w_v = projection(full.blocks[last].attn.v).weight  # (H * d_head, d_model): one key/value head per head
        direction = full.W_U[:, target]
        al.tokens[0] = torch.linalg.solve(w_o @ w_v, 5 * direction)
    readout = token_readout(full, al, items, k=3, batch_size=2)
    # The layer writes c = 5 u_target wherever it is read (one prefix token: attention 1 on it); read with the final
    # norm's scale s at each item's position (its weight is ones at initialisation), that is 5 u_j . u_target / s on
    # token j, centred over the vocabulary: at the answer position and at the response's start.
    written = 5 * (full.W_U.T @ direction).detach()
    scales = {"answer": [], "response start": []}
    with al.attached(full), torch.no_grad():
        for item in items:
            ids, position = answer_position(full, item.prompt, frame_of(item), answer_in_form(item))
            _, n_prompt = example_ids(full.tokenizer, item.prompt, frame_of(item) + answer_in_form(item))
            _, cache = full.run_with_cache(torch.tensor([ids]), names_filter="ln_final.hook_scale")
            scales["answer"].append(float(cache["ln_final.hook_scale"][0, position]))
            scales["response start"].append(float(cache["ln_final.hook_scale"][0, n_prompt - 1]))
    for position, scale in scales.items():
        promoted = readout[(readout["kind"] == "promoted") & (readout["layer"] == last) & (readout["position"] == position)]
        assert promoted.iloc[0]["token_id"] == target
        expected = np.mean([float(written[target] - written.mean()) / s for s in scale])
        assert promoted.iloc[0]["value"] == pytest.approx(expected, rel=1e-4)
    silent = readout[readout["kind"].isin(["promoted", "suppressed"]) & (readout["layer"] == last - 1)]
    assert silent["value"].abs().max() < 1e-5
    assert set(readout["kind"]) == {"promoted", "suppressed", "target", "nearest"}


def test_the_token_readout_at_the_responses_start_scores_the_forms_first_token(model, items):
    # An aligner that writes the form's first token's unembedding direction: at the response's start that token is
    # the target the layer writes most on; at the answer position the target is the gold answer's first token.
    full = aligner.tiny_model(n_kv_heads=4)
    last = full.cfg.n_layers - 1
    al = aligner.Aligner.for_model(full, aligner.AlignerConfig(n_tokens=1, start_layer=last))
    form_token = example_ids(full.tokenizer, items[0].prompt, items[0].response)
    form_token = form_token[0][form_token[1]]
    with torch.no_grad():
        al.gates[0] = 1.0
        w_o = projection(full.blocks[last].attn.o).weight
        w_v = projection(full.blocks[last].attn.v).weight
        al.tokens[0] = torch.linalg.solve(w_o @ w_v, 5 * full.W_U[:, form_token])
    readout = token_readout(full, al, items[:1], k=3)
    target = readout[readout["kind"] == "target"].set_index("position")
    promoted = readout[(readout["kind"] == "promoted") & (readout["position"] == "response start")]
    assert target.loc["response start", "rank"] == 1 and promoted.iloc[0]["token_id"] == form_token
    assert target.loc["response start", "value"] == pytest.approx(promoted.iloc[0]["value"])
    assert target.loc["response start", "token"] == "(each item's form token)"
    assert target.loc["answer", "token"] == "(each item's gold)"


def test_the_nearest_vocabulary_token_to_a_prefix_copied_from_an_embedding_is_that_token(model, items):
    al = random_aligner(model, n_tokens=2)
    with torch.no_grad():
        al.tokens[1] = 3 * model.W_E[777]
    readout = token_readout(model, al, items[:1], k=2)
    nearest = readout[(readout["kind"] == "nearest") & (readout["slot"] == 1)]
    assert nearest.iloc[0]["token_id"] == 777 and nearest.iloc[0]["value"] == pytest.approx(1.0, abs=1e-5)
    assert nearest["layer"].isna().all()  # a shared prefix belongs to no one layer


MEASURES = ["form_logprob", "answer_logprob", "answer_rank1"]


def assert_same(table, mode, layer, reference):
    row = table[(table["mode"] == mode) & (table["layer"] == layer)].iloc[0]
    np.testing.assert_array_equal(row[MEASURES].to_numpy(dtype=float), reference[MEASURES].to_numpy(dtype=float))


def check_one_layer_writes(table, layer, layers):
    """Only `layer` writes: switching it off gives the base, it alone gives the whole adapter, others change nothing,
    to the bit: a zero write adds exactly zero."""
    base, whole = table[table["mode"] == "none"].iloc[0], table[table["mode"] == "all"].iloc[0]
    assert abs(whole["form_logprob"] - base["form_logprob"]) > 1e-3  # the adapter does write
    assert_same(table, "off", layer, base)
    assert_same(table, "only", layer, whole)
    for other in layers:
        if other != layer:
            assert_same(table, "off", other, whole)
            assert_same(table, "only", other, base)


def test_switching_off_the_one_layer_an_aligner_writes_at_restores_the_base_model(model, items):
    al = random_aligner(model, start_layer=1, only_layer=2)
    table = layer_dissociation(model, al, items, batch_size=2)
    assert len(table) == 2 + 2 * 3
    check_one_layer_writes(table, 2, [1, 2, 3])
    framed = [Framed(item.prompt, frame_of(item), answer_in_form(item)) for item in items]
    for mode, adapter in (("none", None), ("all", al)):
        expected = answer_scores(model, adapter, framed)
        row = table[table["mode"] == mode].iloc[0]
        assert row["answer_logprob"] == pytest.approx(np.mean(expected["answer_logprob"]), abs=1e-4)
        assert row["answer_rank1"] == np.mean(expected["answer_rank1"])


def test_switching_off_the_one_layer_a_lora_updates_restores_the_base_model(model, items):
    torch.manual_seed(0)
    lora = LoRA.for_model(model, LoRAConfig(r=2, targets=("q", "v")))
    with torch.no_grad():
        lora.lora_B["1_v"].weight.normal_(std=0.5)
        lora.lora_B["1_q"].weight.normal_(std=0.5)
    table = layer_dissociation(model, lora, items, batch_size=2)
    check_one_layer_writes(table, 1, range(model.cfg.n_layers))


def test_switching_off_the_one_layer_a_z_bias_writes_at_restores_the_base_model(model, items):
    zbias = ZBias.for_model(model, ZBiasConfig(start_layer=1))
    with torch.no_grad():
        zbias.bias[zbias.switchable_layers.index(3)].normal_(std=2.0)
    table = layer_dissociation(model, zbias, items, batch_size=2)
    check_one_layer_writes(table, 3, zbias.switchable_layers)


def test_an_adapter_without_layers_to_switch_is_refused_by_kind(model, items):
    steering = SteeringVector.for_model(model, SteeringConfig(layer=1))
    with pytest.raises(ValueError, match="steering has none to switch"):
        layer_dissociation(model, steering, items)


def test_the_base_model_against_itself_is_all_unshifted_and_a_strong_aligner_is_not(model, items):
    prompts = [item.prompt for item in items]
    strong = random_aligner(model, n_tokens=1)
    with torch.no_grad():
        strong.gates.mul_(20)
    table = token_shift(model, {"base": None, "strong": strong}, prompts, max_new_tokens=6, batch_size=2)
    shares = shift_shares(table).set_index("run")
    assert shares.loc["base", "unshifted"] == 1.0 and shares.loc["base", "n"] == len(table[table["run"] == "base"]) > 0
    assert shares.loc["strong", "shifted"] > 0
    assert shares[["unshifted", "marginal", "shifted"]].sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert (table.loc[table["run"] == "base", "token"] == table.loc[table["run"] == "base", "base_top"]).all()
    assert set(most_shifted(table)["run"]) <= {"strong"}


def test_every_figure_draws_its_table(model, items):
    al = random_aligner(model, n_tokens=1)
    lens = logit_lens(model, al, items[:2])
    readout = token_readout(model, al, items[:2], k=2)
    table = layer_dissociation(model, al, items[:2])
    shift = token_shift(model, {"base": None, "aligner": al}, [items[0].prompt], max_new_tokens=3)
    for figure in (
        logit_lens_figure(lens, "lens"),
        token_readout_figure(readout, "readout"),
        layer_dissociation_figure(table, "dissociation"),
        token_shift_figure(shift, "shift"),
    ):
        assert figure.data and figure.to_json()
