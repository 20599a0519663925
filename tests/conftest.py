"""Shared fixtures: a tiny random Llama for unit tests, SmolLM2-135M-Instruct (offline) for `slow` ones."""

import copy
import os
from pathlib import Path

import pytest
import torch

import aligner

PAPER_ALIGNERS = Path(__file__).resolve().parents[1].parent / "shared" / "paper_aligners"


@pytest.fixture(scope="session")
def smollm2():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the real model must load with no network at all
    return aligner.load_model()


@pytest.fixture(scope="session")
def pristine_tiny():
    return aligner.tiny_model()


@pytest.fixture()
def tiny(pristine_tiny):
    """A fresh tiny model for each test: a copy of one built once (a copy costs half a build)."""
    return copy.deepcopy(pristine_tiny)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared 2-core
    machine two threads spin against each other (30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
