import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from tests.corpus import write_real_text


def write_small_corpus(path: Path, lines: int = 1200) -> Path:
    """Real prose (about 540 kB for 1200 lines): paragraphs of the Wikipedia sample gensim ships."""
    return write_real_text(path, lines)


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
        before = dict(os.environ)
        init_distributed(timeout_s=300)
        # The group exists now. The launcher variables the init exported must not leak into the subprocesses
        # later tests start: with RANK/WORLD_SIZE/MASTER_PORT they would all take this process's store port
        # (held: EADDRINUSE). DeepSpeed's engine still reads LOCAL_RANK in this process; alone, it makes no
        # subprocess a launched rank (training/dist/discovery.py).
        for key in set(os.environ) - set(before) - {"LOCAL_RANK"}:
            del os.environ[key]
        os.environ.update(before)
    yield
