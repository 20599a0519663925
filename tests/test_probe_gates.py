"""Head effects: the attribution estimate of switching one head's gate off, against switching it off."""

import pytest
import torch

import aligner
from aligner.data import Example
from aligner.objective import heldout_loss
from probe.dataset import knowledge_dataset
from probe.gates import head_effects

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model().double()  # float64: a small gate's effect stands far above the rounding




def aligner_with_gates(model, scale: float) -> aligner.Aligner:
    torch.manual_seed(0)
    al = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=2)).double()
    with torch.no_grad():
        al.tokens.normal_(0, 1)
        al.gates.normal_(0, scale)
    return al


def loss_with_gate_zeroed(model, al, examples, layer, head) -> float:
    """The loss with that one gate set to 0 in the parameters themselves (not through the hook)."""
    row = list(al.layer_indices).index(layer)
    saved = al.gates[row, head].item()
    with torch.no_grad():
        al.gates[row, head] = 0.0
    try:
        with al.attached(model):
            return heldout_loss(model, examples, batch_size=4)
    finally:
        with torch.no_grad():
            al.gates[row, head] = saved


# 1e-2: small enough for the first order to be the whole change, large enough that the loss rise (a difference
# of two float32 losses near 10) stands well above their rounding.
@pytest.mark.parametrize("scale", [1e-2, 1.0])
def test_head_effects_estimate_and_measure_the_loss_rise_of_each_head_switched_off(model, scale):
    dataset = knowledge_dataset("capitals", 6)
    al = aligner_with_gates(model, scale)
    targets = [f"The capital is {answers[0]}." for answers in dataset.answers]
    table = head_effects(model, dataset, al, targets, exact=3, batch_size=4)
    assert len(table) == al.gates.numel() and list(table.estimate) == sorted(table.estimate, reverse=True)
    assert table.exact.notna().sum() == 3 and table.exact.head(3).notna().all()

    examples = [Example(p, t) for p, t in zip(dataset.prompts, targets)]
    with al.attached(model):
        reference = heldout_loss(model, examples, batch_size=4)
    for row in table.head(3).itertuples():
        measured = loss_with_gate_zeroed(model, al, examples, row.layer, row.head) - reference
        assert row.exact == pytest.approx(measured, rel=1e-9, abs=1e-12)
        if scale < 0.1:  # the loss is linear in a small gate: first order is the whole change (not so at 1.0)
            assert row.estimate == pytest.approx(measured, rel=0.02, abs=1e-9)
