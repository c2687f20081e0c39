"""Fixtures shared by the test modules: one torch thread for tiny models, and a locally built tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm.tiny import build_tiny  # imports transformers only when called: the toy-world tests do not need it


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run no faster on more threads, and much slower on a shared CPU: a module that says
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` runs on one torch thread, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model (hidden size 32, one layer, seed 1) saved with its tokenizer, once per module."""
    return build_tiny(tmp_path_factory.mktemp("tiny-model"), hidden_size=32, num_layers=1, seed=1)
