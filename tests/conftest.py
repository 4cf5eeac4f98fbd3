import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, which costs 50x when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def task_tokenizer():
    """A small BPE trained on the worked solutions and prompts of some reasoning tasks (memoised)."""
    from seekling.tasks import completion_text, make_problems
    from seekling.tokenizer import Tokenizer

    made = {}

    def build(tasks=("arithmetic",), per_task=300, vocab_size=300):
        key = (tuple(tasks), per_task, vocab_size)
        if key not in made:
            texts = [completion_text(p) + " " + p.prompt for t in tasks for p in make_problems(t, "train", per_task, 0)]
            made[key] = Tokenizer.train(texts, vocab_size=vocab_size)
        return made[key]

    return build


@pytest.fixture(scope="module")
def tokenizer(task_tokenizer):
    return task_tokenizer()
