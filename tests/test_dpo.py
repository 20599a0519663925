"""DPO of an aligner on the tiny model: the pair loaders, the loss and gradients against the formula written out,
the reference on the same model, learning, run directories and resuming, and the command line."""

import contextlib
import gc
import json
import math
import re
from dataclasses import replace

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedModel
from typer.testing import CliRunner

import aligner
from aligner import Aligner, AlignerConfig, DPOConfig, TrainConfig, train_dpo, train_sft
from aligner.adapter import load_adapter
from aligner.chat import example_ids
from aligner.cli import app
from aligner.data import Example, Pair, load_pairs
from aligner.dpo import (
    accumulate_dpo_gradients,
    dpo_loss,
    heldout_dpo_loss,
    pair_logprobs,
    tokenize_pairs,
)
from aligner.methods import LoRA, LoRAConfig
from aligner.objective import pad_token_id

# A fixed preference over varied prompts: something a prefix alone can learn. A high rate keeps the runs short.
PAIRS = [Pair(f"What is {i} + {i}?", "Bananas are yellow.", "Apples are red, sometimes green.") for i in range(4)]
FAST = dict(batch_size=2, lr=0.1, warmup_steps=2)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pku_row(prompt, safer, better):
    return {
        "prompt": prompt,
        "response_0": f"{prompt} answer 0",
        "response_1": f"{prompt} answer 1",
        "is_response_0_safe": safer == 0,
        "is_response_1_safe": safer == 1,
        "safer_response_id": safer,
        "better_response_id": better,
    }


def without(row, field):
    return {name: value for name, value in row.items() if name != field}


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


@pytest.fixture(scope="module")
def sft_run(model, tmp_path_factory):
    """The reference, as in the paper: an aligner trained by SFT on the chosen answers."""
    run_dir = tmp_path_factory.mktemp("runs") / "sft"
    examples = [Example(pair.prompt, pair.chosen) for pair in PAIRS]
    train_sft(model, examples, TrainConfig(steps=3, **FAST), run_dir=run_dir)
    return run_dir


# ---- loading pairs ----


def test_plain_pairs_load(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away", "id": 7}])
    assert load_pairs(path) == [Pair("Hi", "Hello", "Go away")]


def test_pku_saferlhf_rows_choose_the_safer_or_the_better_response(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [pku_row("How?", safer=1, better=0), pku_row("Why?", safer=0, better=0)])
    assert load_pairs(path) == load_pairs(path, prefer="safer") == [
        Pair("How?", "How? answer 1", "How? answer 0"),
        Pair("Why?", "Why? answer 0", "Why? answer 1"),
    ]
    assert load_pairs(path, prefer="better") == [
        Pair("How?", "How? answer 0", "How? answer 1"),
        Pair("Why?", "Why? answer 0", "Why? answer 1"),
    ]
    with pytest.raises(ValueError, match=r"prefer must be one of \['better', 'safer'\], got 'kinder'"):
        load_pairs(path, prefer="kinder")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "missing field 'rejected'"),
        ({"prompt": "Hi", "chosen": " ", "rejected": "No"}, "field 'chosen' is empty"),
        ({**pku_row("Hi", 0, 0), "safer_response_id": 2}, "field 'safer_response_id' must be 0 or 1, found 2"),
        ({**pku_row("Hi", 0, 0), "safer_response_id": True}, "field 'safer_response_id' must be 0 or 1, found True"),
        ({**pku_row("Hi", 0, 0), "safer_response_id": "1"}, "field 'safer_response_id' must be 0 or 1, found '1'"),
        ({**pku_row("Hi", 0, 0), "safer_response_id": None}, "field 'safer_response_id' must be 0 or 1, found None"),
        (without(pku_row("Hi", 0, 0), "safer_response_id"), "missing field 'safer_response_id'"),
        ({**pku_row("Hi", 0, 0), "response_1": None}, "field 'response_1' must be a string, found NoneType"),
        (["Hi", "Hello", "No"], "expected a JSON object, found list"),
    ],
)
def test_bad_pair_row_names_file_row_and_field(tmp_path, row, message):
    pku = isinstance(row, dict) and "response_0" in row
    first = pku_row("First?", 0, 1) if pku else {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, row])
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 2: {message}")):
        load_pairs(path)


def test_empty_or_missing_pair_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no pairs"):
        load_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_a_prompt_too_long_drops_its_pair_whole(model):
    pairs = [Pair("Hi", "Yes.", "No, never."), Pair("Tell me " * 40, "Sure.", "Nope."), Pair("Bye", "Ciao.", "Go.")]
    config = TrainConfig(max_length=40)
    with pytest.warns(UserWarning, match="2 of 6 examples are longer than max_length"):
        sequences = tokenize_pairs(model.tokenizer, pairs, config)
    expected = [pairs[0], pairs[2]]
    assert len(sequences) == 2
    for (chosen, rejected), pair in zip(sequences, expected):
        assert model.tokenizer.decode(chosen[0][chosen[1] :]) == pair.chosen + "<|im_end|>"
        assert model.tokenizer.decode(rejected[0][rejected[1] :]) == pair.rejected + "<|im_end|>"


# ---- the loss ----


def straightforward_dpo(model, policy, reference, pairs, beta, label_smoothing):
    """(mean loss, mean reward margin) of the DPO formula written out: one sequence per forward pass, the response's
    token log-probabilities added one by one; nothing here is shared with aligner.dpo."""

    def logp(al, prompt, response):
        ids, n_prompt = example_ids(model.tokenizer, prompt, response)
        with al.attached(model) if al is not None else contextlib.nullcontext():
            logprobs = model(torch.tensor([ids]))[0].log_softmax(dim=-1)
        return sum(logprobs[t - 1, ids[t]] for t in range(n_prompt, len(ids)))

    losses, margins = [], []
    for pair in pairs:
        with torch.no_grad():
            ref_chosen, ref_rejected = (logp(reference, pair.prompt, y) for y in (pair.chosen, pair.rejected))
        chosen, rejected = (logp(policy, pair.prompt, y) for y in (pair.chosen, pair.rejected))
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        p = torch.sigmoid(beta * h)
        losses.append(-(1 - label_smoothing) * torch.log(p) - label_smoothing * torch.log(1 - p))
        margins.append(beta * h.detach())
    return torch.stack(losses).mean(), torch.stack(margins).mean()


def random_aligner(model, seed):
    torch.manual_seed(seed)
    al = Aligner.for_model(model)
    with torch.no_grad():
        al.gates.normal_(0.0, 0.5)  # far from zero: the policy and the reference differ and padding would show
    return al


def test_loss_and_gradients_equal_the_dpo_formula(model):
    model.requires_grad_(False)
    reference, policy = random_aligner(model, seed=1), random_aligner(model, seed=2)
    # Prompts and responses of different lengths (padding), 5 pairs in forward passes of 2 (an uneven last one).
    pairs = [Pair("Hi" + "!" * i, "Yes" + ", yes" * i + ".", "No" + " way" * (3 - i % 3)) for i in range(5)]
    config = DPOConfig(batch_size=2, beta=0.5, label_smoothing=0.1)
    sequences = tokenize_pairs(model.tokenizer, pairs, config)
    pad_id = pad_token_id(model.tokenizer)
    reference_logps = pair_logprobs(model, reference, sequences, config.batch_size, pad_id)
    with policy.attached(model):
        metrics = accumulate_dpo_gradients(model, sequences, reference_logps, config, pad_id)
    grads = {name: param.grad.clone() for name, param in policy.named_parameters()}
    policy.zero_grad()

    loss, margin = straightforward_dpo(model, policy, reference, pairs, beta=0.5, label_smoothing=0.1)
    loss.backward()
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(margin.item(), rel=1e-4, abs=1e-6)
    assert abs(margin.item()) > 0.01  # the policy and the reference really differ
    for name, param in policy.named_parameters():
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)


def test_dpo_loss_pieces():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -5.0]), torch.tensor([-4.0, -3.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0, 0.1]))
    h = torch.tensor([0.5, -1.0])  # (chosen - ref_chosen) - (rejected - ref_rejected)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-0.1 * h)))  # -log σ(βh) = log(1 + e^(-βh))
    smoothed, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.25)
    expected = 0.75 * torch.log1p(torch.exp(-0.1 * h)) + 0.25 * torch.log1p(torch.exp(0.1 * h))
    torch.testing.assert_close(smoothed, expected)


@pytest.mark.parametrize("field, value", [("beta", 0.0), ("label_smoothing", 0.5), ("label_smoothing", -0.1)])
def test_config_refuses_bad_dpo_settings(field, value):
    with pytest.raises(ValueError, match=f"DPOConfig.{field} must be"):
        DPOConfig(**{field: value})


# ---- training ----


def test_reference_runs_on_the_same_model_and_each_step_is_one_policy_pass(model, sft_run, tmp_path):
    def bridges_and_models():
        objects = gc.get_objects()
        return [sum(issubclass(type(o), kind) for o in objects) for kind in (TransformerBridge, PreTrainedModel)]

    before = bridges_and_models()
    forwards = []

    def record(x, hook):
        forwards.append((getattr(model, "aligner", None), torch.is_grad_enabled(), x.shape[0], bridges_and_models()))

    config = DPOConfig(steps=2, batch_size=2, grad_accum=2, lr=0.1, warmup_steps=0, reference=str(sft_run))
    model.add_hook("blocks.0.hook_resid_pre", record)
    try:
        policy = train_dpo(model, PAIRS, config, run_dir=tmp_path / "run")
    finally:
        model.reset_hooks()
    # The reference pass: 4 pairs, 2 a pass, the SFT aligner attached, no gradients.
    reference_pass, policy_passes = forwards[:2], forwards[2:]
    reference = reference_pass[0][0]
    assert isinstance(reference, Aligner) and reference is not policy
    assert torch.equal(reference.tokens, Aligner.load(sft_run).tokens)
    assert all(al is reference and not grad and rows == 4 for al, grad, rows, _ in reference_pass)
    # Then one pass per forward of each step (2 steps x 2), the policy attached, chosen and rejected together.
    assert len(policy_passes) == 4
    assert all(al is policy and grad and rows == 4 for al, grad, rows, _ in policy_passes)
    assert all(counts == before for *_, counts in forwards)  # no copy of the model, ever
    assert getattr(model, "aligner", None) is None
    assert all(not hook_point.fwd_hooks for hook_point in model.hook_dict.values())
    assert all(not p.requires_grad for p in model.parameters())


def test_base_model_as_reference_starts_the_loss_at_log_2_and_learns_the_preference(model, tmp_path):
    config = DPOConfig(steps=8, log_every=1, save_every=8, beta=0.5, **FAST)
    policy = train_dpo(model, PAIRS, config, run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"step", "lr", "tokens_per_s", "elapsed_s", "loss", "reward_chosen", "reward_rejected",
                            "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"}  # fmt: skip
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # zero gates: the policy is the reference
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1

    sequences = tokenize_pairs(model.tokenizer, PAIRS, config)
    pad_id = pad_token_id(model.tokenizer)
    reference_logps = pair_logprobs(model, None, sequences, 4, pad_id)
    policy_logps = pair_logprobs(model, policy, sequences, 4, pad_id)
    _, chosen_rewards, rejected_rewards = dpo_loss(*policy_logps.unbind(1), *reference_logps.unbind(1), beta=0.5)
    margins = chosen_rewards - rejected_rewards  # zero at step 0
    assert (margins > 0.2).all(), margins
    assert Aligner.load(tmp_path / "run").provenance["training"]["config"]["reference"] is None


def test_policy_starts_from_the_reference(model, sft_run, tmp_path):
    config = DPOConfig(steps=1, log_every=1, reference=str(sft_run), **FAST)
    policy = train_dpo(model, PAIRS, config, run_dir=tmp_path / "run")
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5) and row["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert policy.provenance["initialised_from"] == str(sft_run)
    assert not torch.equal(policy.tokens, Aligner.load(sft_run).tokens)  # it moved; the reference file did not


def test_resume_gives_the_policy_of_a_straight_run_and_refuses_changes(model, sft_run, tmp_path):
    config = DPOConfig(steps=4, batch_size=1, grad_accum=3, save_every=2, lr=0.1, reference=str(sft_run))
    straight = train_dpo(model, PAIRS, config, run_dir=tmp_path / "straight")  # 3 pairs a step: crosses epochs
    train_dpo(model, PAIRS, replace(config, steps=2), run_dir=tmp_path / "split")
    resumed = train_dpo(model, PAIRS, config, run_dir=tmp_path / "split", resume=True)
    assert torch.equal(resumed.tokens, straight.tokens) and torch.equal(resumed.gates, straight.gates)
    assert Aligner.load(tmp_path / "split").provenance["training"]["step"] == 4

    with pytest.raises(ValueError, match=r"other settings \(beta: 0.1 -> 0.2\)"):
        train_dpo(model, PAIRS, replace(config, beta=0.2), run_dir=tmp_path / "split", resume=True)
    with pytest.raises(ValueError, match="other data"):
        train_dpo(model, PAIRS[:3], config, run_dir=tmp_path / "split", resume=True)
    with pytest.raises(FileExistsError, match="run directory exists"):
        train_dpo(model, PAIRS, config, run_dir=tmp_path / "split")


def test_resume_refuses_a_changed_reference(model, sft_run, tmp_path):
    reference_dir = tmp_path / "reference"
    Aligner.load(sft_run).save(reference_dir)
    config = DPOConfig(steps=2, reference=str(reference_dir), **FAST)
    train_dpo(model, PAIRS, replace(config, steps=1), run_dir=tmp_path / "run")
    changed = Aligner.load(reference_dir)
    with torch.no_grad():
        changed.gates.add_(0.01)
    changed.save(reference_dir)
    with pytest.raises(ValueError, match="other data"):
        train_dpo(model, PAIRS, config, run_dir=tmp_path / "run", resume=True)


def test_a_policy_of_its_own_beside_a_reference_is_refused_unless_a_copy_of_it(model, sft_run):
    """The policy starts as a copy of the reference: a caller's own copy is trained in place, another adapter
    could only disagree with it. At step 0 the held-out DPO loss is log 2."""
    other = Aligner.for_model(model, AlignerConfig(n_tokens=2))
    with pytest.raises(ValueError, match="the policy starts from the reference .*; the adapter given is not a copy of it"):
        train_dpo(model, PAIRS, DPOConfig(steps=1, reference=str(sft_run), **FAST), adapter=other)
    config = DPOConfig(steps=2, reference=str(sft_run), **FAST)
    copy, reference = load_adapter(sft_run), load_adapter(sft_run)
    pairs = tokenize_pairs(model.tokenizer, PAIRS, config)
    pad = pad_token_id(model.tokenizer)
    reference_logps = pair_logprobs(model, reference, pairs, 2, pad)
    with copy.attached(model):
        assert heldout_dpo_loss(model, pairs, reference_logps, config, pad) == pytest.approx(math.log(2))
    losses = []

    def on_step(step: int, loss: float) -> bool:
        losses.append(loss)
        return False  # never stops

    trained = train_dpo(model, PAIRS, config, adapter=copy, on_step=on_step)
    assert trained is copy and len(losses) == 2 and not torch.equal(copy.tokens, reference.tokens)


def test_a_lora_reference_gives_a_lora_policy_that_learns_the_preference(model, tmp_path):
    torch.manual_seed(0)
    lora = LoRA.for_model(model, LoRAConfig(r=2))
    with torch.no_grad():
        for param in lora.parameters():
            param.normal_(0.0, 0.05)  # B off zero: a reference that differs from the base model
    lora.save(tmp_path / "lora")
    config = DPOConfig(steps=4, reference=str(tmp_path / "lora"), beta=0.5, **FAST)
    policy = train_dpo(model, PAIRS, config)
    assert isinstance(policy, LoRA) and policy.provenance["initialised_from"] == str(tmp_path / "lora")
    train_dpo(model, PAIRS, replace(config, steps=2), run_dir=tmp_path / "run")  # a run directory, resumed
    resumed = train_dpo(model, PAIRS, config, run_dir=tmp_path / "run", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), policy.state_dict().values()))
    assert load_adapter(tmp_path / "run").provenance["training"]["step"] == 4

    reference = load_adapter(tmp_path / "lora")
    sequences = tokenize_pairs(model.tokenizer, PAIRS, config)
    pad_id = pad_token_id(model.tokenizer)
    reference_logps = pair_logprobs(model, reference, sequences, 4, pad_id)
    policy_logps = pair_logprobs(model, policy, sequences, 4, pad_id)
    _, chosen_rewards, rejected_rewards = dpo_loss(*policy_logps.unbind(1), *reference_logps.unbind(1), beta=0.5)
    assert (chosen_rewards > rejected_rewards).all(), (chosen_rewards, rejected_rewards)


# ---- the command line ----

runner = CliRunner()


def test_cli_sft_then_dpo_on_pku_rows(tmp_path):
    rows = [pku_row(f"Q{i}?", safer=i % 2, better=0) for i in range(4)]
    pku = write_jsonl(tmp_path / "pku.jsonl", rows)
    safe_answers = [{"prompt": r["prompt"], "response": r[f"response_{r['safer_response_id']}"]} for r in rows]
    safe = write_jsonl(tmp_path / "safe.jsonl", safe_answers)
    common = ["--model", "tiny", "--steps", "2", "--batch-size", "2", "--lr", "0.05", "--warmup-steps", "0"]
    sft = runner.invoke(app, ["train", "--data", str(safe), "--out", str(tmp_path / "sft"), *common])
    assert sft.exit_code == 0, sft.output
    # SFT straight from the PKU rows on their safer responses: the same data, so the same aligner
    from_pairs = ["train", "--data", str(pku), "--prefer", "safer", "--out", str(tmp_path / "sft-pairs"), *common]
    sft_pairs = runner.invoke(app, from_pairs)
    assert sft_pairs.exit_code == 0, sft_pairs.output
    a, b = Aligner.load(tmp_path / "sft"), Aligner.load(tmp_path / "sft-pairs")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gates, b.gates)
    args = ["train", "--objective", "dpo", "--data", str(pku), "--out", str(tmp_path / "dpo"), *common]
    dpo = runner.invoke(app, [*args, "--reference", str(tmp_path / "sft"), "--beta", "0.2", "--prefer", "better"])
    assert dpo.exit_code == 0, dpo.output
    assert "4 pairs from" in dpo.output and "trained 2 steps in" in dpo.output
    al = Aligner.load(tmp_path / "dpo")
    training = al.provenance["training"]
    assert (training["config"]["beta"], training["config"]["reference"]) == (0.2, str(tmp_path / "sft"))
    assert al.provenance["initialised_from"] == str(tmp_path / "sft")
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "reward_accuracy" in rows[-1]
    info = runner.invoke(app, ["info", str(tmp_path / "dpo")])
    assert info.exit_code == 0 and "beta=0.2" in info.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/safe.jsonl", "--beta", "0.2"], "--reference, --beta and --label-smoothing need"),
        (["--objective", "dpo", "--data", "{tmp}/bad.jsonl"], "bad.jsonl, row 2: field 'safer_response_id' must be 0"),
        (["--objective", "dpo", "--data", "{tmp}/safe.jsonl"], "safe.jsonl, row 1: missing field 'chosen'"),
        (["--objective", "dpo", "--data", "{tmp}/pku.jsonl", "--label-smoothing", "0.7"], "label_smoothing must be"),
    ],
)
def test_cli_bad_dpo_input_gives_one_error_line(tmp_path, args, message):
    write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    write_jsonl(tmp_path / "pku.jsonl", [pku_row("A?", 0, 0)])
    write_jsonl(tmp_path / "bad.jsonl", [pku_row("A?", 0, 0), {**pku_row("B?", 0, 0), "safer_response_id": 5}])
    args = ["train", "--out", str(tmp_path / "r"), "--model", "tiny", *[arg.format(tmp=tmp_path) for arg in args]]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.output.startswith("Error: ") and message in result.output
