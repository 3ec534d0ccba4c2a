import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from tests.helpers.corpus import write_real_text


def write_small_corpus(path: Path, lines: int = 1200) -> Path:
    """Real prose (about 540 kB for 1200 lines): paragraphs of the Wikipedia sample gensim ships."""
    return write_real_text(path, lines)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset (seq_len 64, vocab 512) shared by the tests that train."""
    from training.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = write_small_corpus(root / "corpus.txt")
    prepare([str(corpus)], str(root / "data"), seq_len=64, tokenizer="train:512", num_proc=1, quiet=True,
            heldout_fraction=0.01)
    return root / "data"


@pytest.fixture(scope="session")
def _dist_group():
    """The one-process gloo group, made once per session. The launcher variables its init exported are taken
    back out of os.environ at once: left there, every subprocess a later test starts (or a Slurm daemon a
    fixture starts) would see RANK/WORLD_SIZE/MASTER_PORT, a launched rank on this process's held store port
    (EADDRINUSE), or LOCAL_RANK, a distributed run to transformers' Trainer."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from training.dist import init_distributed
        before = dict(os.environ)
        init_distributed(timeout_s=300)
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


@pytest.fixture
def dist_single(_dist_group, monkeypatch):
    """A one-process gloo group, as `python -m training.pretrain` makes without a launcher. DeepSpeed's engine
    reads LOCAL_RANK in this process: set for the test only."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    yield


@pytest.fixture
def fresh_fused_ops():
    """Each FusedOp forgets what it imported, disabled and logged, before and after the test; yields
    training.model.fused."""
    from training.model import fused

    for op in fused.ALL_OPS:
        op.reset()
    yield fused
    for op in fused.ALL_OPS:
        op.reset()
