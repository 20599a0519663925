"""Supervised fine-tuning of an aligner on the tiny model: what takes loss, what learns, what is saved, resuming."""

import json
from dataclasses import replace

import pytest
import torch

import aligner
from aligner import Aligner, AlignerConfig, TrainConfig, train_sft
from aligner.data import Example
from aligner.objective import IGNORE_INDEX, make_batch, response_loss, tokenize_examples
from aligner.train import stream_order

# A fixed reply to varied prompts: something a prefix alone can teach. A high rate keeps the run short.
EXAMPLES = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(8)]
FAST = dict(batch_size=2, lr=0.1, warmup_steps=2, log_every=5)


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """20 steps on EXAMPLES, written to a run directory; with the base fingerprint taken before."""
    fingerprint = aligner.model_fingerprint(model)
    run_dir = tmp_path_factory.mktemp("runs") / "bananas"
    config = TrainConfig(steps=20, save_every=10, data="bananas.jsonl", **FAST)
    return train_sft(model, EXAMPLES, config, run_dir=run_dir), run_dir, fingerprint


def mean_loss(model, al: Aligner | None) -> float:
    input_ids, labels = make_batch(tokenize_examples(model.tokenizer, EXAMPLES, TrainConfig()), pad_id=0)
    with torch.no_grad():
        if al is None:
            loss = response_loss(model, input_ids, labels)
        else:
            with al.attached(model):
                loss = response_loss(model, input_ids, labels)
    return (loss / (labels[:, 1:] != IGNORE_INDEX).sum()).item()


def test_labels_mask_prompt_and_padding():
    input_ids, labels = make_batch([([5, 6, 7, 8, 9], 3), ([5, 6, 7], 2)], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]  # right padding
    assert labels.tolist() == [[IGNORE_INDEX] * 3 + [8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_the_loss_reads_logits_from_the_first_response_position_on_and_equals_the_full_ones(model):
    input_ids, labels = make_batch([([5, 6, 7, 8, 9, 10], 3), ([5, 6, 7, 8], 2)], pad_id=0)  # first label at 2
    with torch.no_grad():
        full = model(input_ids)
        expected = torch.nn.functional.cross_entropy(
            full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        widths = []
        with model.hooks(fwd_hooks=[("unembed.hook_out", lambda logits, hook: widths.append(logits.shape[1]))]):
            loss = response_loss(model, input_ids, labels)
    assert widths == [5]  # positions 1-5 of 0-5: position 1 predicts the first label
    torch.testing.assert_close(loss, expected)


def test_response_targets_end_with_the_end_of_turn_token(model):
    [(ids, n_prompt)] = tokenize_examples(model.tokenizer, EXAMPLES[:1], TrainConfig())
    _, labels = make_batch([(ids, n_prompt)], pad_id=0)
    targets = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert model.tokenizer.decode(targets) == "Bananas are yellow.<|im_end|>"


def test_too_long_examples_are_cut_with_a_warning(model):
    [(full, n_prompt)] = tokenize_examples(model.tokenizer, EXAMPLES[:1], TrainConfig())
    with pytest.warns(UserWarning, match="1 of 1 examples are longer than max_length"):
        [(cut, _)] = tokenize_examples(model.tokenizer, EXAMPLES[:1], TrainConfig(max_length=n_prompt + 2))
    assert cut == full[: n_prompt + 2]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no example keeps a response token"):
        tokenize_examples(model.tokenizer, EXAMPLES[:1], TrainConfig(max_length=n_prompt))


def test_data_order_is_a_seeded_permutation_per_epoch():
    stream = stream_order(5, seed=0, start=0, count=15)
    epochs = [stream[0:5], stream[5:10], stream[10:15]]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert stream_order(5, seed=0, start=3, count=4) == stream[3:7]  # across an epoch boundary, no replay needed
    assert stream_order(5, seed=1, start=0, count=15) != stream


def test_sft_lowers_the_loss(model, trained):
    al, run_dir, _ = trained
    before, after = mean_loss(model, None), mean_loss(model, al)
    assert after < before - 0.2, (before, after)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 15, 20]
    assert set(rows[0]) == {"step", "loss", "lr", "tokens_per_s", "elapsed_s"}
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_only_tokens_and_gates_learn_and_base_weights_stay(model, trained):
    al, _, fingerprint = trained
    assert aligner.model_fingerprint(model) == fingerprint
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert dict(al.named_parameters()).keys() == {"tokens", "gates"}
    assert al.tokens.grad is not None and al.tokens.grad.abs().sum() > 0
    assert al.gates.grad is not None and al.gates.grad.abs().sum() > 0
    assert al.gates.abs().sum() > 0  # moved off zero


def test_saved_aligner_loads_bit_exact_with_its_training_provenance(trained):
    al, run_dir, _ = trained
    loaded = Aligner.load(run_dir)
    assert torch.equal(loaded.tokens, al.tokens) and torch.equal(loaded.gates, al.gates)
    training = loaded.provenance["training"]
    assert training["config"]["data"] == "bananas.jsonl" and training["config"]["lr"] == 0.1
    assert training["step"] == 20 and training["examples"] == len(EXAMPLES)
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["step"], state["position"]) == (20, 40)
    assert sorted(p.name for p in run_dir.glob("state-*.safetensors")) == ["state-00000020.safetensors"]


def test_resume_gives_the_aligner_of_a_straight_run(model, tmp_path):
    config = TrainConfig(steps=6, grad_accum=2, save_every=2, **FAST)  # 4 examples a step: crosses epochs
    straight = train_sft(model, EXAMPLES, config, run_dir=tmp_path / "straight")
    train_sft(model, EXAMPLES, replace(config, steps=3), run_dir=tmp_path / "split")
    resumed = train_sft(model, EXAMPLES, config, run_dir=tmp_path / "split", resume=True)
    assert torch.equal(resumed.tokens, straight.tokens) and torch.equal(resumed.gates, straight.gates)
    assert Aligner.load(tmp_path / "split").provenance["training"]["step"] == 6

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows}

    assert losses("split") == {3: losses("split")[3], **losses("straight")}  # a run's last step is always logged


def test_resume_refuses_other_settings_or_data(model, trained):
    _, run_dir, _ = trained
    config = TrainConfig(steps=20, save_every=10, **FAST)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        train_sft(model, EXAMPLES, replace(config, lr=0.2), run_dir=run_dir, resume=True)
    with pytest.raises(ValueError, match="other data"):
        train_sft(model, EXAMPLES[:4], config, run_dir=run_dir, resume=True)


def test_existing_run_directory_is_not_overwritten(model, trained, tmp_path):
    _, run_dir, _ = trained
    before = (run_dir / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="run directory exists"):
        train_sft(model, EXAMPLES, TrainConfig(steps=1, **FAST), run_dir=run_dir)
    assert (run_dir / "adapter.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no training state to resume"):
        train_sft(model, EXAMPLES, TrainConfig(steps=1, **FAST), run_dir=tmp_path / "new", resume=True)


def test_grad_accum_weighs_tokens_as_one_larger_batch(model):
    one = train_sft(model, EXAMPLES, TrainConfig(steps=2, batch_size=4, grad_accum=1, lr=0.1, warmup_steps=0))
    split = train_sft(model, EXAMPLES, TrainConfig(steps=2, batch_size=2, grad_accum=2, lr=0.1, warmup_steps=0))
    torch.testing.assert_close(split.tokens, one.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.gates, one.gates, atol=1e-5, rtol=0)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(model, tmp_path):
    forwards = []

    def poison_third_step(x, hook):
        forwards.append(None)
        return x * float("nan") if len(forwards) == 3 else x

    config = TrainConfig(steps=3, save_every=2, **{**FAST, "log_every": 1})
    model.add_hook("blocks.3.hook_resid_post", poison_third_step)
    try:
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 3; .* \(checkpoint of step 2 kept\)"):
            train_sft(model, EXAMPLES, config, run_dir=tmp_path / "run")
    finally:
        model.reset_hooks()
    kept = Aligner.load(tmp_path / "run")
    assert torch.isfinite(kept.tokens).all() and kept.provenance["training"]["step"] == 2

    # As if killed after logging step 3 but before its checkpoint: resuming takes step 3 again, and logs it once.
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 3, "loss": -1.0}) + "\n")
    train_sft(model, EXAMPLES, config, run_dir=tmp_path / "run", resume=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["loss"] > 0


def test_a_given_adapter_is_trained_further_and_the_training_config_holds_no_shape(model):
    given = Aligner.for_model(model, AlignerConfig(n_tokens=2))
    assert train_sft(model, EXAMPLES, TrainConfig(steps=1, **FAST), adapter=given) is given
    assert given.gates.abs().sum() > 0 and given.tokens.shape[0] == 2
    with pytest.raises(TypeError, match="n_tokens"):
        TrainConfig(steps=1, n_tokens=2)


def test_the_rate_defaults_to_the_adapter_familys_and_is_recorded(model):
    from aligner.methods import LoRA, LoRAConfig
    from aligner.registry import default_lr

    lora = train_sft(model, EXAMPLES, TrainConfig(steps=1, batch_size=2), adapter=LoRA.for_model(model, LoRAConfig(2)))
    aligner = train_sft(model, EXAMPLES, TrainConfig(steps=1, batch_size=2))
    assert lora.provenance["training"]["config"]["lr"] == default_lr("lora") != default_lr("aligner") == 9e-3
    assert aligner.provenance["training"]["config"]["lr"] == 9e-3
    for bad in ({"lr": float("inf")}, {"lr": -1.0}, {"steps": 2.5}, {"batch_size": True}):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))}"):
            TrainConfig(**bad)
