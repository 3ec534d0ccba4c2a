"""Adding a method is one module and one registry line, for each of the three kinds (training/stages/README.md):
a toy method of each kind, defined here and registered through the public registries for the test only, trains
a few steps in the running job with nothing else changed."""
import json

import pytest
import torch
from torch import nn

from tests.helpers.tiny_run import make_runner, tiny_config
from training.model import params
from training.model.addon import Addon
from training.model.addons import ADDONS
from training.stages.hooks import HOOKS
from training.stages.modifiers import MODIFIERS
from training.stages.protocol import Hook, HookArgs, Modifier, StepContext


# ------------------------------------------------------------------------- kind 1: a weight transform (a hook)

class ZeroHeadBias(Hook):
    """Enter a stage with the MLM output bias zeroed; its optimizer moments start fresh (dropped)."""
    name = "toy_zero_head_bias"

    def transform(self, tensors, old, new, moment, ctx):
        out = dict(tensors)
        if moment == 0:  # the weights; the state dict names the bias twice (the decoder's is the same tensor)
            zero = torch.zeros_like(out["cls.predictions.bias"])
            out.update({name: zero for name in ("cls.predictions.bias", "cls.predictions.decoder.bias")
                        if name in out})
        else:  # a carried moment of a reset tensor: none (fresh state)
            out.pop("cls.predictions.bias", None)
        return out


# ------------------------------------------------------------------ kind 2: added parameters (a model add-on)

class LayerGate(Addon):
    """A learned scalar per encoder layer scaling its output (1 at the start: the same function), pulled back
    towards 1 by a named auxiliary loss."""
    name = "toy_gate"
    ROLES = (("layer", r"toy_gate", ("",)),)

    def attach(self, model: nn.Module) -> None:
        for layer in model.bert.encoder.layer:
            layer.register_parameter("toy_gate", nn.Parameter(torch.ones(1)))
            layer.register_forward_hook(lambda module, args, out: out * module.toy_gate.to(out.dtype))

    def aux_losses(self, model: nn.Module) -> dict:
        gates = torch.stack([layer.toy_gate.float() for layer in model.bert.encoder.layer])
        return {"toy_gate_pull": self.args.get("weight", 1.0) * ((gates - 1) ** 2).sum() + 1e-3}


# ------------------------------------------------------------------- kind 3: a training modifier

class FixedDropArgs(HookArgs):
    keep: float = 0.5


class FixedLayerDrop(Modifier):
    """Keep the top layer with a fixed probability (a constant-rate layer drop): its forward arguments, the FLOPs
    a step computes with them, and a field in every evaluation."""
    name, Args = "toy_fixed_drop", FixedDropArgs

    @classmethod
    def check(cls, cfg, index, start_step) -> None:
        if cls.configured(cfg, index) is not None:
            cfg.stage_model(index).check_layer_drop()

    def forward_kwargs(self, at: StepContext) -> dict:
        probs = [1.0] * (at.model.num_layers - 1) + [self.args.keep]
        return {"layer_keep_prob": probs, "layer_drop_generator": torch.Generator().manual_seed(at.step)}

    def flops_args(self, kwargs: dict) -> dict:
        return {"keep_probs": kwargs["layer_keep_prob"]}

    def eval_record(self, at: StepContext, evaluate) -> dict:
        return {"toy_keep": self.args.keep}


def _records(runner, kind: str) -> list[dict]:
    lines = (runner.out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_weight_transform_is_a_hook_and_a_registry_line(tmp_path, tiny_data, dist_single):
    text = "stages:\n  - {name: a, steps: 2}\n  - {name: b, steps: 2, hook: toy_zero_head_bias}\n"
    with HOOKS.added(ZeroHeadBias):
        runner = make_runner(tiny_config(tmp_path, tiny_data, yaml_text=text))
        entered = runner.enter_stage
        seen = []

        def spy(index):
            seconds = entered(index)
            seen.append(runner.engine.module.cls.predictions.bias.detach().clone())
            return seconds

        runner.enter_stage = spy
        state = runner.run()
    assert state.step == 4 and len(seen) == 1 and not seen[0].any()
    assert [r["hook"] for r in _records(runner, "transition")] == ["toy_zero_head_bias"]
    assert runner.engine.module.cls.predictions.bias.abs().sum() > 0  # and trained on from zero
    assert "toy_zero_head_bias" not in HOOKS  # registered for the block only


def test_added_parameters_are_an_addon_and_a_registry_line(tmp_path, tiny_data, dist_single):
    text = "model: {addons: {toy_gate: {weight: 0.5}}}\ntrain: {max_steps: 3}\n"
    with ADDONS.added(LayerGate):
        runner = make_runner(tiny_config(tmp_path, tiny_data, yaml_text=text))
        name = "bert.encoder.layer.1.toy_gate"
        assert params.describe(name).layer == 1 and params.describe(name).addon == "toy_gate"
        first = next(runner.batches())  # what the run's first step trains on
        with torch.no_grad():
            out = runner.model.train()(**first)
        assert set(out["aux_losses"]) == {"toy_gate_pull"}  # trained on beside the MLM loss, not reported in it
        assert float(out["loss"]) == float(out["mlm_loss"] + out["aux_losses"]["toy_gate_pull"])
        runner.run()
        gates = {n: p for n, p in runner.engine.module.named_parameters() if n.endswith("toy_gate")}
    assert set(gates) == {"bert.encoder.layer.0.toy_gate", name}
    assert all(float(g.detach()) != 1.0 for g in gates.values())  # the optimizer trained them
    train = _records(runner, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["loss"] == pytest.approx(float(out["mlm_loss"]), rel=1e-5)  # the step leaves the aux loss out


def test_a_training_modifier_is_a_module_and_a_registry_line(tmp_path, tiny_data, dist_single):
    from training.model.flops import flops_per_token

    text = ("model: {norm: pre}\nstages:\n  - {name: a, steps: 4, modifiers: {toy_fixed_drop: {keep: 0.25}}}\n")
    with MODIFIERS.added(FixedLayerDrop):
        cfg = tiny_config(tmp_path, tiny_data, ["run.eval_every=2"], yaml_text=text)
        runner = make_runner(cfg)
        seen = []
        forward = runner.model.forward

        def spy(*args, **kwargs):
            seen.append(kwargs.get("layer_keep_prob"))
            return forward(*args, **kwargs)

        runner.model.forward = spy
        runner.run()
    assert [type(m) for m in runner.training.modifiers] == [FixedLayerDrop]
    training = [p for p in seen if p is not None]
    assert len(training) == 4 and all(p == [1.0, 0.25] for p in training)
    full = flops_per_token(cfg.model, 64, cfg.data.mlm_probability)
    dropped = flops_per_token(cfg.model, 64, cfg.data.mlm_probability, keep_probs=[1.0, 0.25])
    assert dropped < full
    assert all(r["flops_per_token"] == pytest.approx(dropped, rel=1e-12) for r in _records(runner, "train"))
    assert [(r["step"], r["toy_keep"]) for r in _records(runner, "eval")] == [(2, 0.25), (4, 0.25)]
