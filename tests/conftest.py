"""Fixtures shared by the test modules."""

import pytest
import torch

from tiny_models import save_tiny_chat_base, single_thread

THREADS = torch.get_num_threads()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """Directory of a tiny random Llama with SmolLM2's tokenizer and chat template (see tiny_models)."""
    return save_tiny_chat_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (its module fixtures included): tiny models gain
    nothing from a second thread, and a waiting OpenMP team is slow on shared CPUs."""
    with single_thread():
        yield


@pytest.fixture
def all_threads():
    """All threads again, inside a one_thread module, for a test on the embedded SmolLM2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
