"""A base model placed by `device_map` (aligner.load_model(..., device_map=...)), for inference on a model larger
than one device: layers offloaded to disk here, as accelerate does on a machine without the GPUs, so that each
layer's weights are brought in only while it runs. The attached aligner must give what it gives on the model held
whole: the same logits and the same greedy answers."""

import pytest
import torch

import aligner
from aligner import Aligner, AlignerConfig
from aligner.loading import model_fingerprint, tiny_llama

PROMPTS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny random Llama (grouped-query attention) saved as a Hugging Face directory, with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    for part in tiny_llama():
        part.save_pretrained(path)
    return path


def test_an_aligner_on_a_model_with_offloaded_layers_equals_the_model_held_whole(model_dir, tmp_path):
    whole = aligner.load_model(str(model_dir))
    placed = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placed |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}  # the adapted layers 1 and 3 too
    offloaded = aligner.load_model(str(model_dir), device_map=placed, offload_folder=tmp_path / "offload")
    assert offloaded.blocks[1].attn.k.original_component.weight.is_meta  # on disk between its forwards
    assert model_fingerprint(offloaded) == model_fingerprint(whole)  # read from disk where offloaded

    al = Aligner.for_model(whole, AlignerConfig(n_tokens=3, start_layer=1))
    with torch.no_grad():
        al.gates.normal_()
    ids = torch.randint(0, 1000, (2, 7))
    with al.attached(whole), torch.no_grad():
        want = whole(ids)
    with al.attached(offloaded), torch.no_grad():
        got = offloaded(ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - offloaded(ids)).abs().max() > 1e-3  # the aligner mattered

    answers = aligner.generate(whole, PROMPTS, aligner=al, max_new_tokens=6)
    assert aligner.generate(offloaded, PROMPTS, aligner=al, max_new_tokens=6) == answers


def test_merging_into_offloaded_weights_is_refused(model_dir, tmp_path):
    placed = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placed |= {f"model.layers.{i}": "disk" for i in range(4)}
    offloaded = aligner.load_model(str(model_dir), device_map=placed, offload_folder=tmp_path / "offload")
    al = Aligner.for_model(offloaded, AlignerConfig(n_tokens=1, start_layer=1))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.o: its weights are offloaded \(device_map\)"):
        al.merge_into(offloaded)
    assert offloaded.blocks[1].attn.o.original_component.bias is None  # nothing changed


def test_aligner_generate_takes_a_device_map(model_dir):
    from typer.testing import CliRunner

    from aligner.cli import app

    args = ["generate", PROMPTS[0], "--model", str(model_dir), "--max-new-tokens", "4"]
    plain, placed = (CliRunner().invoke(app, args + extra) for extra in ([], ["--device-map", "auto"]))
    assert plain.exit_code == 0 and placed.exit_code == 0, plain.output + placed.output
    answers = [result.output[result.output.index("--- ") :] for result in (plain, placed)]  # after the progress bars
    assert answers[0] == answers[1] and "base:" in answers[1]
