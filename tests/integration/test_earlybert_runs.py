"""EarlyBERT in the running job: the early-bird search ends its stage, rewinds and prunes; a resume across the
prune matches an uninterrupted run."""
import json

import pytest
import torch

from tests.helpers.tiny_run import make_runner, tiny_config
from training.engine import checkpoint
from training.errors import UserError

SEARCH = """
stages:
  - {name: search, steps: 6, model: {slimming: true, slimming_l1: 1.0e-3}}
  - name: pruned
    steps: 3
    hook: prune
    hook_args: {ratio_heads: 0.5, ratio_ffn: 0.4, rewind: init, search: {interval: 1, window: 2, threshold: 1.0}}
    optimizer_state: reset
    warmup_steps: 1
    model: {slimming: false}
"""


HEADS4 = ["model.num_heads=4"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_search_draws_early_rewinds_and_prunes_in_the_running_job(tmp_path, tiny_data, dist_single):
    # The first stage's LR warmup (4 steps) outlasts the search (2 steps): its segment is cut at the draw.
    cfg = tiny_config(tmp_path, tiny_data, HEADS4 + ["run.stop_at_step=2", "optimizer.warmup_steps=4"],
                      yaml_text=SEARCH)
    runner = make_runner(cfg)
    init = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    runner.run()  # the ticket is drawn at step 2 (two masks within distance < 1): the search stage ends
    assert runner.state.stage_index == 0 and runner.schedule[0].steps == 2
    assert runner.schedule[1].start_step == 2 and runner.schedule[1].steps == 7 and runner.total_steps == 9
    saved = torch.load(tmp_path / "out" / "earlybert" / "init.pt", weights_only=True)
    torch.testing.assert_close(saved["bert.embeddings.word_embeddings.weight"],
                               init["bert.embeddings.word_embeddings.weight"], rtol=0, atol=0)
    assert runner.schedule.lr(2) == 0.0 and runner.schedule.lr(3) > 0.0  # the pruned stage's warmup (1 step) moved to step 2
    runner.enter_stage(1)
    assert runner.model_cfg.heads_per_layer == [2, 2] and not runner.model_cfg.slimming
    assert sum(runner.model_cfg.ffn_per_layer) == int(0.6 * 2 * 64 + 0.5)
    module = runner.engine.module
    assert not any("coef" in n for n, _ in module.named_parameters())
    # Rewound: untouched tensors are the initial ones, pruned ones are slices of them.
    torch.testing.assert_close(module.bert.embeddings.word_embeddings.weight,
                               init["bert.embeddings.word_embeddings.weight"], rtol=0, atol=0)
    ticket = json.loads((tmp_path / "out" / "earlybert" / "ticket.json").read_text())
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in ticket["heads"][0]])
    torch.testing.assert_close(module.bert.encoder.layer[0].attention.self.query.weight,
                               init["bert.encoder.layer.0.attention.self.query.weight"][rows], rtol=0, atol=0)
    records = [m for m in _metrics(tmp_path / "out") if m["kind"] == "earlybird"]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["drawn"]


@pytest.mark.parametrize("stop_at", [2, 4])  # at the draw (still the search stage), inside the pruned stage
def test_resume_across_the_prune_matches_an_uninterrupted_run(tmp_path, tiny_data, dist_single, stop_at):
    full = make_runner(tiny_config(tmp_path / "full", tiny_data, HEADS4, yaml_text=SEARCH))
    state = full.run()
    assert state.step == 9
    expected = [m["loss"] for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "train"]
    assert [t["step"] for t in _metrics(tmp_path / "full" / "out") if t["kind"] == "transition"] == [2]

    make_runner(tiny_config(tmp_path / "cut", tiny_data, HEADS4 + [f"run.stop_at_step={stop_at}"],
                            yaml_text=SEARCH)).run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, HEADS4, yaml_text=SEARCH), seed=9)
    meta = resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    # The early end is the schedule's state, in the checkpoint, and the resume restores it (no replayed plan).
    assert meta["components"]["schedule"] == {"ends": {"0": 2}}
    assert resumed.schedule.ends == {0: 2} and resumed.schedule[1].start_step == 2 and resumed.total_steps == 9
    if stop_at == 4:  # per-layer sizes come from the checkpoint's meta.json
        assert resumed.model_cfg.heads_per_layer == [2, 2]
    resumed.run()
    got = [m["loss"] for m in _metrics(tmp_path / "cut" / "out") if m["kind"] == "train"]
    assert got == expected
    a, b = full.engine.module.state_dict(), resumed.engine.module.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)

    # Export: HF BERT cannot hold fewer heads than hidden/head_dim; the error names the layers.
    from training.model.hf_export import export_hf
    with pytest.raises(UserError, match="layer 0: 2, layer 1: 2 of 4"):
        export_hf(resumed.engine.module, resumed.model_cfg, tmp_path / "hf")
