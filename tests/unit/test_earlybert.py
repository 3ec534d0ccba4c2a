"""EarlyBERT: slimming coefficients and penalty, tickets and early-bird detection, physical pruning, and a
search -> prune run in the running job (checkpoint, resume, export)."""
import json

import pytest
import torch

from tests.helpers.tiny_run import tiny_config
from training.errors import UserError
from training.model import BertForPreTraining, ModelConfig
from training.model.flops import count_parameters
from training.stages import earlybert as eb, transfer
from training.stages.hooks import HOOKS
from training.stages.protocol import HookContext

SMALL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position=32,
             dropout=0.0, attention_dropout=0.0)


def _ids(seed=0, batch=2, seq=9):
    return torch.randint(1, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_coefficients_have_hf_free_names_start_at_one_and_change_nothing():
    cfg = ModelConfig(**SMALL, slimming=True)
    torch.manual_seed(0)
    slim = BertForPreTraining(cfg).eval()
    names = {n: p for n, p in slim.named_parameters() if "coef" in n}
    assert set(names) == {f"bert.encoder.layer.{i}.{k}" for i in range(2) for k in (eb.HEAD_COEF, eb.NEURON_COEF)}
    assert all(bool((p == 1).all()) for p in names.values())
    assert names["bert.encoder.layer.0.attention.self.head_coef"].shape == (4,)
    assert names["bert.encoder.layer.1.intermediate.neuron_coef"].shape == (64,)
    plain = BertForPreTraining(ModelConfig(**SMALL)).eval()
    plain.load_state_dict({k: v for k, v in slim.state_dict().items() if "coef" not in k})
    ids = _ids()
    torch.testing.assert_close(slim(ids)["logits"], plain(ids)["logits"], rtol=0, atol=0)


def test_l1_penalty_only_in_training_and_its_gradient():
    cfg = ModelConfig(**SMALL, slimming=True, slimming_l1=1e-2)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.head_coef[1] = -2.0
    ids = _ids()
    labels = ids.clone()
    model.eval()
    plain = model(ids, labels=labels)
    assert "slimming_penalty" not in plain.get("aux_losses", {})
    model.train()
    out = model(ids, labels=labels)
    n = 2 * (4 + 64)
    expected = 1e-2 * (n - 1 + 2.0)
    # A named auxiliary loss of the model (its add-on's), in the loss it trains on, not in the MLM loss it reports.
    assert abs(float(out["aux_losses"]["slimming_penalty"].detach()) - expected) < 1e-6
    assert abs(float(out["loss"].detach()) - float(plain["loss"].detach()) - expected) < 1e-5
    assert float(out["mlm_loss"]) == pytest.approx(float(plain["mlm_loss"]), abs=1e-6)
    # The penalty's gradient is lambda * sign(c) on top of the MLM gradient: compare with lambda 0.
    out["loss"].backward()
    with_penalty = model.bert.encoder.layer[0].attention.self.head_coef.grad.clone()
    model.zero_grad()
    model.cfg = cfg.model_copy(update={"slimming_l1": 0.0})
    model(ids, labels=labels)["loss"].backward()
    without = model.bert.encoder.layer[0].attention.self.head_coef.grad
    torch.testing.assert_close(with_penalty - without, torch.tensor([1e-2, -1e-2, 1e-2, 1e-2]), rtol=0, atol=1e-7)


def test_ticket_prunes_heads_layerwise_and_neurons_globally():
    heads = [torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.8]), torch.tensor([1.0, 1.0, -3.0, 0.0, 2.0, 1.0])]
    neurons = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    t = eb.draw_ticket(heads, neurons, ratio_heads=1 / 3, ratio_ffn=0.5)
    assert t.heads == [[0, 2, 3, 5], [0, 1, 2, 4]]  # |c|; ties (1.0 at 0, 1, 5) go to the lower index
    # Global: the 4 smallest of 8 are all in layer 0, which still keeps its largest neuron.
    assert t.neurons == [[3], [0, 1, 2, 3]] and t.ffn_per_layer == [1, 4]
    t12 = eb.draw_ticket([torch.rand(12)], [torch.rand(10)], ratio_heads=0.3333333333, ratio_ffn=0.4)
    assert t12.heads_per_layer == [8] and t12.ffn_per_layer == [6]
    # Distance: normalised Hamming, the larger of heads' and neurons'.
    t2 = eb.draw_ticket([torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.8]), heads[1]], neurons, 1 / 3, 0.5)
    assert eb.mask_distance(t, t) == 0.0
    assert eb.mask_distance(t, t2) == pytest.approx(2 / 12)


class _Coefs(torch.nn.Module):
    """Just the coefficient parameters, with the model's names."""

    def __init__(self, heads, neurons):
        super().__init__()
        for i, (h, n) in enumerate(zip(heads, neurons)):
            layer = torch.nn.Module()
            layer.attention = torch.nn.Module()
            layer.attention.self = torch.nn.Module()
            layer.attention.self.head_coef = torch.nn.Parameter(h.clone())
            layer.intermediate = torch.nn.Module()
            layer.intermediate.neuron_coef = torch.nn.Parameter(n.clone())
            setattr(self, f"l{i}", layer)

    def named_parameters(self, *a, **k):
        for name, p in super().named_parameters(*a, **k):
            yield name.replace("l", "bert.encoder.layer.", 1), p


def test_early_bird_draws_once_the_last_masks_agree(tmp_path):
    args = eb.Prune({"ratio_heads": 0.5, "ratio_ffn": 0.5, "rewind": "keep",
                     "search": {"interval": 2, "window": 3, "threshold": 0.1}}).args
    records = []
    search = eb.EarlyBirdSearch(args, tmp_path, records.append)
    gen = torch.Generator().manual_seed(0)
    assert not search.start(0, 0, _Coefs([torch.rand(4)], [torch.rand(20)]))
    drawn_at = None
    for step in range(1, 40):
        # Masks keep changing until step 12, then the coefficients settle.
        coefs = _Coefs([torch.rand(4, generator=gen)], [torch.rand(20, generator=gen)]) if step <= 12 else \
            _Coefs([torch.tensor([1.0, 0.1, 0.9, 0.2])], [torch.arange(20.0)])
        if search.observe(step, coefs):
            drawn_at = step
            break
    assert drawn_at == 18  # masks at 14, 16, 18 agree (step 12's random one may not)
    assert [r["step"] for r in records] == list(range(2, 19, 2)) and records[-1]["drawn"]
    assert {"neuron_coef_mean", "head_coef_below_0.1", "distance_max"} <= set(records[-1])
    ticket = json.loads((tmp_path / "earlybert" / "ticket.json").read_text())
    assert ticket["step"] == 18 and ticket["heads"] == [[0, 2]] and ticket["neurons"] == [list(range(10, 20))]
    # A resumed search (from step 16) reloads the masks drawn so far and draws at the same step.
    again = eb.EarlyBirdSearch(args, tmp_path, lambda r: None)
    assert not again.start(16, 16, coefs)
    assert [s for s, _ in again.history] == list(range(2, 17, 2))
    assert again.observe(18, coefs)
    # Resumed from a checkpoint taken at the draw: it is drawn already.
    assert eb.EarlyBirdSearch(args, tmp_path, lambda r: None).start(18, 18, coefs)


def _slim_model_with_dead_units(seed=0):
    """A random slimming model whose pruned-to-be units have coefficient 0 and kept ones random values."""
    cfg = ModelConfig(**SMALL, slimming=True)
    torch.manual_seed(seed)
    model = BertForPreTraining(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for i, layer in enumerate(model.bert.encoder.layer):
            layer.attention.self.head_coef.copy_(torch.rand(4) + 0.5)
            layer.attention.self.head_coef[i] = 0.0  # one head of each layer dead: ratio 1/4
            coef = torch.rand(64) + 0.5
            coef[i * 8: i * 8 + 20] = 0.0  # 40 of 128 dead: uneven across layers (global ratio)
            layer.intermediate.neuron_coef.copy_(coef)
    return cfg, model.eval()


def test_pruning_dead_units_preserves_the_function_and_counts(tmp_path):
    cfg, model = _slim_model_with_dead_units()
    hook = HOOKS["prune"]({"ratio_heads": 0.25, "ratio_ffn": 40 / 128, "rewind": "keep"})
    declared = cfg.model_copy(update={"slimming": False})
    ctx = HookContext(step=5, out_dir=tmp_path)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new_cfg = hook.resolve(cfg, declared, weights, ctx)
    assert new_cfg.heads_per_layer == [3, 3] and new_cfg.ffn_per_layer == [44, 44] and not new_cfg.slimming
    pruned = BertForPreTraining(new_cfg).eval()
    pruned.load_state_dict(hook.transform(weights, cfg, new_cfg, transfer.WEIGHTS, ctx))  # strict: names/shapes
    ids = _ids(seed=3, batch=3, seq=11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    torch.testing.assert_close(pruned(ids, attention_mask=mask)["logits"], model(ids, attention_mask=mask)["logits"],
                               rtol=1e-5, atol=1e-5)
    attn = pruned.bert.encoder.layer[1].attention
    assert attn.self.query.weight.shape == (3 * 8, 32) and attn.output.dense.weight.shape == (32, 24)
    h, d = SMALL["hidden_size"], cfg.head_dim
    removed = 2 * (3 * (h * d + d) + h * d)  # one head per layer: Q/K/V rows + biases, O columns
    removed += 40 * (h + 1 + h)  # neurons: intermediate row + bias, output column
    removed += 2 * (4 + 64)  # the coefficients themselves
    assert count_parameters(pruned) == count_parameters(model) - removed
    ticket = json.loads((tmp_path / "earlybert" / "ticket.json").read_text())
    assert ticket["heads"] == [[1, 2, 3], [0, 2, 3]] and ticket["ffn_per_layer"] == [44, 44]


def test_moments_are_cut_like_weights_and_scaled_like_the_folded_gradient(tmp_path):
    """The folded column W * c gets the gradient / c: exp_avg x 1/c, exp_avg_sq x 1/c**2 (autograd:
    tests/unit/test_moments.py); coefficients' moments are dropped."""
    cfg, model = _slim_model_with_dead_units()
    hook = HOOKS["prune"]({"ratio_heads": 0.25, "ratio_ffn": 40 / 128, "rewind": "keep"})
    ctx = HookContext(step=5, out_dir=tmp_path)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new_cfg = hook.resolve(cfg, cfg.model_copy(update={"slimming": False}), weights, ctx)
    ones = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    coef = model.bert.encoder.layer[0].attention.self.head_coef.detach()
    for power in (1, 2):
        m = hook.transform(ones, cfg, new_cfg, power, ctx)
        assert not any("coef" in k for k in m)
        o = m["bert.encoder.layer.0.attention.output.dense.weight"]
        assert o.shape == (32, 24)
        torch.testing.assert_close(o[0, :8], (1 / coef[1]).expand(8) ** power)  # head 0 pruned; kept head 1 first
        assert torch.equal(m["bert.encoder.layer.0.attention.self.query.weight"], torch.ones(24, 32))


@pytest.mark.parametrize("stages,needle", [
    ("[{name: a, steps: 2}, {name: b, steps: 2, hook: prune, model: {slimming: false}}]", "slimming: true"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, optimizer_state: carry, "
     "model: {slimming: false}}]", "optimizer_state: reset"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, optimizer_state: reset, "
     "model: {slimming: true}}]", "slimming: false"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, "
     "model: {slimming: false}, hook_args: {rewind: keep, ratio: 0.3}}]", "unknown hook_args"),
    # typed hook_args (PruneArgs), one line naming the key
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, "
     "model: {slimming: false}, hook_args: {rewind: later}}]", "hook_args.rewind: Input should be 'init' or 'keep'"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, "
     "model: {slimming: false}, hook_args: {ratio_ffn: 1.5}}]", "hook_args.ratio_ffn: Input should be less than 1"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, "
     "model: {slimming: false}, hook_args: {search: {window: 1}}}]", "hook_args.search.window"),
    ("[{name: a, steps: 2, model: {slimming: true}}, {name: b, steps: 2, hook: prune, "
     "model: {slimming: false}, hook_args: {ratio_heads: half}}]", "hook_args.ratio_heads must be float"),
])
def test_prune_schedule_checks(tmp_path, tiny_data, stages, needle):
    with pytest.raises(UserError, match=needle):
        tiny_config(tmp_path, tiny_data, yaml_text=f"stages: {stages}\n")


def test_shipped_configs_load():
    from training.stages.plan import load_config

    for name in ("earlybert_default", "earlybert_bert_base"):
        cfg = load_config(f"configs/{name}.yaml")
        args = eb.Prune(cfg.stages[1].hook_args).args
        assert cfg.stage_model(0).slimming and not cfg.stage_model(1).slimming
        assert args.ratio_ffn == 0.4 and args.rewind == "init" and args.search.threshold == 0.1
        heads = eb.draw_ticket([torch.rand(cfg.model.num_heads)], [torch.rand(10)], args.ratio_heads, 0.4)
        assert heads.heads_per_layer == [cfg.model.num_heads - cfg.model.num_heads // 3]


def test_a_slimming_model_exports_with_the_coefficients_folded(tmp_path):
    import transformers
    from training.model.hf_export import export_hf

    cfg, model = _slim_model_with_dead_units()
    export_hf(model, cfg, tmp_path / "hf")
    hf, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(seed=5)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids).logits
    assert (model(ids)["logits"] - ref).abs().max() < 1e-4


def test_a_bert_checkpoint_initialises_a_slimming_model_with_unit_coefficients(tmp_path):
    from training.model.hf import load_hf_weights
    from training.model.hf_export import export_hf

    cfg, model = _slim_model_with_dead_units()
    plain_cfg = cfg.model_copy(update={"slimming": False})
    export_hf(model, cfg, tmp_path / "hf")  # folded
    slim = BertForPreTraining(cfg).eval()
    missing = load_hf_weights(slim, tmp_path / "hf")
    assert sorted(k for k in missing if "coef" in k) == sorted(n for n, _ in slim.named_parameters() if "coef" in n)
    plain = BertForPreTraining(plain_cfg).eval()
    load_hf_weights(plain, tmp_path / "hf")
    ids = _ids(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(slim(ids)["logits"], plain(ids)["logits"], rtol=0, atol=0)
        torch.testing.assert_close(slim(ids)["logits"], model(ids)["logits"], rtol=1e-5, atol=1e-5)


def test_rewind_init_refuses_a_missing_or_stale_init_file(tmp_path):
    """One rank (no process group): a plain load, with the one-line errors every rank would share."""
    cfg, model = _slim_model_with_dead_units()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="rewind: init needs .*init.pt.*missing"):
        eb.load_init_weights(tmp_path, weights)
    eb.save_init_weights({k: v for k, v in weights.items() if "coef" not in k}, tmp_path)
    with pytest.raises(UserError, match="does not match the search stage's model"):
        eb.load_init_weights(tmp_path, weights)
    eb.save_init_weights(weights, tmp_path)
    loaded = eb.load_init_weights(tmp_path, weights)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_enter_draws_one_ticket_for_the_weights_and_every_moment(tmp_path):
    """Hook.enter, the boundary's one call: the prune hook resolves the ticket once and cuts the weights and
    both moments with it (the moments carry no coefficients of their own), the same as resolve + transform."""

    from training.stages.protocol import Boundary

    cfg, model = _slim_model_with_dead_units()
    args = {"ratio_heads": 0.25, "ratio_ffn": 40 / 128, "rewind": "keep"}
    hook = HOOKS["prune"](args)
    declared = cfg.model_copy(update={"slimming": False})
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {"exp_avg": {k: torch.randn_like(v) for k, v in weights.items()},
               "exp_avg_sq": {k: torch.rand_like(v) for k, v in weights.items()}}
    entered = hook.enter(Boundary(step=5, out_dir=tmp_path, old=cfg, declared=declared, weights=weights,
                                  moments=moments))
    ctx = HookContext(step=5, out_dir=tmp_path)
    new_cfg = hook.resolve(cfg, declared, weights, ctx)
    assert entered.model == new_cfg
    torch.testing.assert_close(entered.weights, hook.transform(weights, cfg, new_cfg, transfer.WEIGHTS, ctx))
    for key, power in transfer.MOMENT_POWER.items():
        torch.testing.assert_close(entered.moments[key], hook.transform(moments[key], cfg, new_cfg, power, ctx))
        assert {k: v.shape for k, v in entered.moments[key].items()} == \
            {k: v.shape for k, v in entered.weights.items() if k in entered.moments[key]}
