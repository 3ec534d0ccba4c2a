"""CoRe in the running job: the refine boundary on a DeepSpeed engine, a two-phase run resumed and exported, the cost CLI."""
import json

import torch
import transformers

from tests.helpers.tiny_run import make_runner, tiny_config
from training.engine import checkpoint
from training.stages import core, transfer

TWO_PHASE = """
stages:
  - {name: relaxed, steps: 3, model: {attention: linear, ffn_rank: 8}}
  - {name: refined, steps: 2, hook: core_refine, optimizer_state: carry, warmup_steps: 1}
"""


def test_cli_prints_relaxed_and_full_costs(capsys):
    assert core.main(["--config", "configs/core_default.yaml"]) == 0
    out = capsys.readouterr().out
    assert "stage relaxed: relaxed (attention linear, ffn_rank 64" in out and "stage refined: full" in out
    assert "MFLOP/token" in out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_refine_in_the_running_job_carries_state_except_the_new_ffn(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=3"], yaml_text=TWO_PHASE)
    runner = make_runner(cfg)
    runner.run()
    old = transfer.fp32_weights(runner.engine)
    runner.enter_stage(1)
    assert runner.model_cfg.attention == "sdpa" and runner.model_cfg.ffn_rank is None
    new = transfer.fp32_weights(runner.engine)
    key = "bert.encoder.layer.1.output.dense."
    u, v = old[key.replace("dense.", "dense_u.") + "weight"], old[key.replace("dense.", "dense_v.") + "weight"]
    want = v.double() @ u.double()
    torch.testing.assert_close(new[key + "weight"], want.float(), rtol=0, atol=0)
    torch.testing.assert_close(new[key + "bias"], old[key.replace("dense.", "dense_v.") + "bias"], rtol=0, atol=0)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(new[q], old[q], rtol=0, atol=0)
    moments, steps = transfer.optimizer_moments(runner.engine)
    ffn = {f"bert.encoder.layer.{i}.{part}.dense.{w}" for i in range(2) for part in ("intermediate", "output")
           for w in ("weight", "bias")}
    assert not ffn & set(steps)  # fresh state for the products
    assert set(steps.values()) == {3} and q in steps
    assert len(steps) == len(list(runner.engine.module.parameters())) - len(ffn)


def test_two_phase_run_resumes_and_exports_to_hf(tmp_path, tiny_data, dist_single):
    from training import export

    full = make_runner(tiny_config(tmp_path / "full", tiny_data, yaml_text=TWO_PHASE))
    full.run()
    transitions = [m for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "transition"]
    assert [t["hook"] for t in transitions] == ["core_refine"]
    train = [m for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "train"]
    assert train[0]["flops_per_token"] < train[-1]["flops_per_token"]  # relaxed, then full

    # Resume from the last relaxed step's checkpoint: the refine happens in the resumed process.
    make_runner(tiny_config(tmp_path / "cut", tiny_data, ["run.stop_at_step=3"], yaml_text=TWO_PHASE)).run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, yaml_text=TWO_PHASE), seed=7)
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    resumed.run()
    a, b = full.engine.module.state_dict(), resumed.engine.module.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)

    # The refined model has HF BERT's names and shapes: export, load in transformers, same logits.
    assert export.main(["--checkpoint", str(tmp_path / "full" / "out"), "--out", str(tmp_path / "hf")]) == 0
    hf, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ours = full.engine.module.eval()
    batch = next(full.data.heldout_batches(4, max_batches=1))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)["logits"]
    assert (got - ref).abs().max() < 1e-4
