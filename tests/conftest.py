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


def make_pretrain_corpus(root, num_examples: int, val_fraction: float) -> dict:
    """A 512-token tokenizer (the tiny preset's vocabulary) trained on task text and some English, and token
    shards of arithmetic/linear problems: what the pre-training and fault tests train on."""
    from seekling.data import build_token_shards
    from seekling.tasks import completion_text, make_mixture
    from seekling.tokenizer import Tokenizer

    problems = make_mixture(["arithmetic", "countdown", "linear", "wordproblem"], "train", 100, seed=0)
    english = ["The quick brown fox jumps over the lazy dog.\n", "She sells sea shells by the sea shore.\n"] * 20
    tok = Tokenizer.train([p.prompt for p in problems] + [completion_text(p) for p in problems] + english, 512)
    assert tok.vocab_size == 512
    tok.save(root / "tok")
    build_token_shards(root / "data", tok, tasks=["arithmetic", "linear"], num_examples=num_examples,
                       val_fraction=val_fraction)
    return {"root": root, "tok": str(root / "tok"), "data": str(root / "data")}
