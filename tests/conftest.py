import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lzma
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "debian-docs.txt.xz"


def write_small_corpus(path: Path, lines: int = 3000) -> Path:
    """Real prose: the first lines of the shared Debian docs corpus, or generated text without it."""
    if CORPUS.is_file():
        with lzma.open(CORPUS, "rt", encoding="utf-8", errors="replace") as f:
            text = [next(f) for _ in range(lines)]
    else:
        import random
        rng = random.Random(0)
        words = "the a model of data train layer stage grows when each token is masked and then predicted".split()
        text = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 60))) + "\n" for _ in range(lines)]
    path.write_text("".join(text))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset (seq_len 64, vocab 512) shared by the tests that train."""
    from training.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = write_small_corpus(root / "corpus.txt")
    prepare([str(corpus)], str(root / "data"), seq_len=64, tokenizer="train:512", num_proc=1, quiet=True)
    return root / "data"


@pytest.fixture(scope="session")
def dist_single():
    """A one-process gloo group, as `python -m training.pretrain` makes without a launcher."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from training.dist import init_distributed
        init_distributed(timeout_s=300)
    yield
