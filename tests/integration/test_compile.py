"""model.compile: torch.compile of each encoder layer (training/model/compiled.py) computes what the eager model
computes, keeps every parameter name, and survives what the runner does to a model: a growth transition,
checkpoint/resume, layer drop's skipped layers, the fused kernels' fallback. Slow: inductor compiles C++."""
import json

import pytest
import torch

from tests.helpers.tiny_run import make_runner, tiny_config
from training.engine import checkpoint
from training.model import BertForPreTraining, ModelConfig
from training.model.ops import dropout

pytestmark = pytest.mark.slow

SHAPE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position=32, dropout=0.0,
             attention_dropout=0.0)


def _grads(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, labels=labels, **kwargs)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [
    {},  # Post-LN, sdpa
    {"attention": "fused", "fused_ops": ["bias_gelu", "residual_layernorm", "mlm_loss"]},  # kernels fall back on CPU
    {"norm": "pre"},  # with layer drop below
])
def test_compiled_model_matches_eager_forward_and_backward(extra):
    torch.manual_seed(0)
    eager = BertForPreTraining(ModelConfig(**SHAPE, **extra)).train()
    compiled = BertForPreTraining(ModelConfig(**SHAPE, **extra, compile=True)).train()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: the names checkpoints use
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 7:] = 0
    labels = torch.full((3, 12), -100)
    labels[0, [1, 5]] = torch.tensor([4, 50])
    labels[2, 3] = 9
    kwargs = [{}]
    if extra.get("norm") == "pre":  # layer drop: a layer skipped, the other scaled by 1/keep
        kwargs.append({"layer_keep_prob": [0.5, 1.0], "layer_drop_generator": torch.Generator().manual_seed(1)})
    for kw in kwargs:
        gen = kw.get("layer_drop_generator")
        loss_e, grads_e = _grads(eager, ids, mask, labels, **kw)
        if gen is not None:
            kw = {**kw, "layer_drop_generator": torch.Generator().manual_seed(1)}
        loss_c, grads_c = _grads(compiled, ids, mask, labels, **kw)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_inside_a_compiled_graph_keeps_its_rate_and_scale():
    torch.manual_seed(2)
    x = torch.ones(512, 1024)
    y = torch.compile(lambda t: dropout(t, 0.3))(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - round(0.3 * 2 ** 16) / 2 ** 16)))


STACK = """
stages:
  - {name: s1, steps: 3, model: {num_layers: 1}}
  - {name: s2, steps: 3, hook: stack, optimizer_state: carry}
"""


def _records(out_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_compile_survives_a_growth_transition_and_resume(tmp_path, tiny_data, dist_single):
    """Stacking 1 -> 2 layers with model.compile: the losses of the eager run (fp32, no dropout), a compile record
    per stage; cut in stage 2 and resumed, the run logs the uncut run's losses."""
    eager = make_runner(tiny_config(tmp_path / "eager", tiny_data, yaml_text=STACK))
    eager.run()
    compiled = make_runner(tiny_config(tmp_path / "compiled", tiny_data, ["model.compile=true"], yaml_text=STACK))
    compiled.run()
    loss_e = [r["loss"] for r in _records(tmp_path / "eager" / "out", "train")]
    loss_c = [r["loss"] for r in _records(tmp_path / "compiled" / "out", "train")]
    assert len(loss_e) == len(loss_c) == 6
    assert loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-4)
    compiles = _records(tmp_path / "compiled" / "out", "compile")
    assert [(r["stage"], r["step"]) for r in compiles] == [("s1", 1), ("s2", 4)] and all(r["seconds"] > 0
                                                                                         for r in compiles)
    assert not _records(tmp_path / "eager" / "out", "compile")

    over = ["model.compile=true", "run.save_every=1"]
    make_runner(tiny_config(tmp_path / "cut", tiny_data, over + ["run.stop_at_step=5"], yaml_text=STACK)).run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, over, yaml_text=STACK), seed=5)
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    resumed.run()
    assert [r["loss"] for r in _records(tmp_path / "cut" / "out", "train")] == loss_c
