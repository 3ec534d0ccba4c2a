"""Optimizer moments through the stage operators follow the gradients, measured with autograd.

For every hook that carries moments: a random model (every tensor perturbed, dropout 0), one backward on
the old model and one on the transformed model on the same batch; the OLD gradients go through the hook's
moment path (moment 1, as exp_avg) and the squared old gradients through moment 2 (as exp_avg_sq), and
must equal the NEW model's gradients (squared), tensor by tensor, for every parameter of the new model.
In float64, so the stated tolerance (rtol 1e-7, atol 1e-9 of the model's largest gradient: the key bias's
gradient is zero up to rounding, softmax being shift-invariant) separates a right rule from rounding by
many orders of magnitude; a wrong factor (k, 1/c) is off by 50% or more.
Where no exact gradient rule exists (stack, the new rows of a longer position table, CoRe's refined FFN
and its attention switch), the test checks what the operator promises instead.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.model import BertForPreTraining, ModelConfig
from training.stages import core, growth, transfer
from training.stages.hooks import HOOKS
from training.stages.protocol import Hook, HookContext

BASE = dict(vocab_size=100, hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, max_position=40,
            dropout=0.0, attention_dropout=0.0)
RTOL, ATOL = 1e-7, 1e-9  # atol relative to the model's largest gradient
POSITIONS = "bert.embeddings.position_embeddings.weight"


def cfg(**over) -> ModelConfig:
    return ModelConfig(**{**BASE, **over})


def random_model(c: ModelConfig, seed: int = 0) -> BertForPreTraining:
    """Every tensor perturbed (in fp32, then float64: all values stay fp32-exact)."""
    torch.manual_seed(seed)
    model = BertForPreTraining(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.double().eval()


def batch(vocab: int, seed: int = 1, size: int = 3, seq: int = 16) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, seq), generator=gen)
    mask = torch.ones(size, seq, dtype=torch.long)
    mask[1, seq - 5:] = 0
    ids[mask == 0] = 0
    labels = torch.full((size, seq), -100)
    chosen = (torch.rand(size, seq, generator=gen) < 0.4) & (mask == 1)
    labels[chosen] = torch.randint(0, vocab, (int(chosen.sum()),), generator=gen)
    types = (torch.arange(seq) >= seq // 2).long().expand(size, seq)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0]))


def gradients(model: BertForPreTraining, b: dict) -> dict[str, torch.Tensor]:
    """name -> gradient for named_parameters() (the tied decoder weight is the word embedding's)."""
    model.zero_grad()
    kwargs = b if model.cfg.nsp else {k: v for k, v in b.items() if k != "next_sentence_label"}
    model(**kwargs)["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _hook(hook: str | Hook) -> Hook:
    """A hook instance: a name makes one without hook_args."""
    return HOOKS[hook]() if isinstance(hook, str) else hook


def transformed(hook_name: str | Hook, old_cfg: ModelConfig, new_cfg: ModelConfig, model: BertForPreTraining,
                ctx: HookContext) -> BertForPreTraining:
    """The new model, holding the hook's weights (moment 0), loaded strictly."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = BertForPreTraining(new_cfg).double().eval()
    new.load_state_dict(_hook(hook_name).transform(weights, old_cfg, new_cfg, transfer.WEIGHTS, ctx))
    return new


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, scale: float | None = None,
                 tol: tuple[float, float] = (RTOL, ATOL)) -> None:
    """`scale`: the model's largest |gradient| (to that power); default the tensor's own."""
    assert got.shape == want.shape, what
    scale = float(want.abs().max()) if scale is None else scale
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1] * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def moment_paths(hook_name, old_cfg, new_cfg, old_grads, ctx):
    hook = _hook(hook_name)
    return {power: hook.transform({k: g ** power for k, g in old_grads.items()}, old_cfg, new_cfg, power, ctx)
            for power in transfer.MOMENT_POWER.values()}


def check_against_autograd(hook_name: str, old_cfg: ModelConfig, new_cfg: ModelConfig, tmp_path: Path,
                           model=None, ctx_args=None, seq: int = 16, resolve: bool = False,
                           tol: tuple[float, float] = (RTOL, ATOL)):
    """Run the comparison; returns (old grads, new grads, moment paths) for extra checks."""
    ctx = HookContext(step=0, out_dir=tmp_path)
    hook = HOOKS[hook_name](ctx_args)  # one instance: what resolve draws (prune's ticket), transform uses
    model = model if model is not None else random_model(old_cfg)
    if resolve:  # a hook that decides the new shape from the weights (prune)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        new_cfg = hook.resolve(old_cfg, new_cfg, weights, ctx)
    new_model = transformed(hook, old_cfg, new_cfg, model, ctx)
    b = batch(old_cfg.vocab_size, seq=seq)
    with torch.no_grad():  # the operator is function-preserving on this batch: same loss
        kwargs = b if old_cfg.nsp else {k: v for k, v in b.items() if k != "next_sentence_label"}
        loss0, loss1 = model(**kwargs)["loss"], new_model(**kwargs)["loss"]
    assert abs(float(loss1 - loss0)) <= tol[0] * 1e-3 * abs(float(loss0))
    old_grads, new_grads = gradients(model, b), gradients(new_model, b)
    paths = moment_paths(hook, old_cfg, new_cfg, old_grads, ctx)
    largest = max(float(g.abs().max()) for g in new_grads.values())
    for power, moments in paths.items():
        assert set(moments) == set(new_grads), power  # every parameter of the new model, nothing else
        for name, want in new_grads.items():
            if name == POSITIONS and new_cfg.max_position > old_cfg.max_position:
                continue  # checked by the grow_seq test: only the old rows have a rule
            assert_close(moments[name], want ** power, f"{hook_name} moment {power} {name}", largest ** power, tol)
    return old_grads, new_grads, paths


# ------------------------------------------------------------------------------------------ width growth

@pytest.mark.parametrize("k", [2, 3])
def test_grow_ffn_moments_follow_the_gradients(tmp_path, k):
    old = cfg()
    new = cfg(ffn_size=64 * k)
    old_grads, new_grads, paths = check_against_autograd("grow_ffn", old, new, tmp_path)
    # What the rule says, spelled out: a copied output.dense column (weight / k) gets the same gradient,
    # a copied intermediate.dense row (weight unchanged) 1/k of it.
    w2, w1 = "bert.encoder.layer.1.output.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"
    assert_close(new_grads[w2], old_grads[w2].repeat(1, k), "output.dense")
    assert_close(new_grads[w1], old_grads[w1].repeat(k, 1) / k, "intermediate.dense")
    assert torch.equal(paths[1][w2], old_grads[w2].repeat(1, k))
    assert torch.equal(paths[2][w1], (old_grads[w1] ** 2).repeat(k, 1) / k ** 2)


@pytest.mark.parametrize("norm,attention,k,nsp", [("post", "sdpa", 2, True), ("pre", "sdpa", 2, False),
                                                  ("post", "eager", 3, True)])
def test_grow_hidden_moments_follow_the_gradients(tmp_path, norm, attention, k, nsp):
    """Every tensor, the tied word embedding / decoder weight and the MLM-transform LayerNorm (weight / k,
    gradient x 1) included."""
    old = cfg(norm=norm, attention=attention, nsp=nsp)
    new = cfg(norm=norm, attention=attention, nsp=nsp, hidden_size=32 * k, num_heads=2 * k)
    old_grads, new_grads, paths = check_against_autograd("grow_hidden", old, new, tmp_path)
    ln = "cls.predictions.transform.LayerNorm.weight"
    assert_close(new_grads[ln], old_grads[ln].repeat(k), "head LayerNorm: gradient unchanged")
    emb = "bert.embeddings.word_embeddings.weight"
    assert_close(new_grads[emb], old_grads[emb].repeat(1, k) / k, "tied word embedding: 1/k")


@pytest.mark.parametrize("hook_name", ["grow_width", "compound"])
def test_width_and_compound_growth_moments_follow_the_gradients(tmp_path, hook_name):
    old = cfg(nsp=True)
    new = cfg(nsp=True, hidden_size=64, num_heads=4, ffn_size=256)  # hidden x2, FFN x2 on top
    check_against_autograd(hook_name, old, new, tmp_path)


def test_growth_of_a_pruned_low_rank_relaxed_model_follows_the_gradients(tmp_path):
    """Per-layer sizes (a pruned model) and CoRe's factorised FFN under linear attention, widened.
    linear_attention computes in fp32 whatever the input dtype: fp32 tolerances (rtol 1e-5, atol 1e-7 of
    the largest gradient; the worst seen is 6e-6 relative on entries 1e-8 of the largest)."""
    old = cfg(attention="linear", ffn_rank=8, heads_per_layer=[1, 2], ffn_per_layer=[40, 64])
    new = old.model_copy(update=dict(hidden_size=64, num_heads=4, heads_per_layer=[2, 4], ffn_size=128,
                                     ffn_per_layer=[80, 128]))
    check_against_autograd("grow_width", old, new, tmp_path, tol=(1e-5, 1e-7))


def test_grow_seq_old_rows_follow_the_gradients_new_rows_are_copies(tmp_path):
    old, new = cfg(max_position=16), cfg(max_position=40)
    old_grads, new_grads, paths = check_against_autograd("grow_seq", old, new, tmp_path, seq=16)
    assert not new_grads[POSITIONS][16:].any()  # no gradient reaches the new rows: no rule to follow
    for power, moments in paths.items():
        assert_close(moments[POSITIONS][:16], new_grads[POSITIONS][:16] ** power, "old rows")
        # The documented choice: the new rows start with the moments of the rows they copy.
        assert torch.equal(moments[POSITIONS], (old_grads[POSITIONS] ** power)[torch.arange(40) % 16])


# ------------------------------------------------------------------------------------------ depth growth

@pytest.mark.parametrize("power", [1, 2])
def test_stack_has_no_gradient_rule_and_copies_the_moments(tmp_path, power):
    """Stacking is not function-preserving (the new layers act on the old layers' output), so the new
    model's gradients are not a function of the old ones. The promise: every moment of a new layer is its
    source layer's, unscaled; everything else passes through."""
    old, new = cfg(), cfg(num_layers=4)
    moments = {n: torch.rand_like(p) for n, p in random_model(old).named_parameters()}
    out = HOOKS["stack"]().transform(moments, old, new, power, HookContext(0, tmp_path))
    assert set(out) == {n for n, _ in BertForPreTraining(new).named_parameters()}
    for name, t in out.items():
        src = name.replace("layer.2.", "layer.0.").replace("layer.3.", "layer.1.")
        assert torch.equal(t, moments[src]) and (t is moments[name] if name == src else t is not moments[src])


@pytest.mark.parametrize("power", [0, 1, 2])
def test_compound_with_depth_is_the_width_rule_then_copies(tmp_path, power):
    """With stacking in a compound growth there is no exact rule for the whole; each step applies its own
    (width: the gradient factor; stack: copies) and the widening commutes with the copying."""
    old = cfg()
    new = cfg(hidden_size=64, num_heads=4, ffn_size=128, num_layers=4, max_position=64)
    moments = {n: torch.rand_like(p) + 0.5 for n, p in random_model(old).named_parameters()}
    out = HOOKS["compound"]().transform(moments, old, new, power, HookContext(0, tmp_path))
    s1 = old.model_copy(update=dict(num_layers=4))
    s2 = s1.model_copy(update=dict(ffn_size=128))
    s3 = s2.model_copy(update=dict(hidden_size=64, num_heads=4))
    manual = growth.grow_seq(growth.grow_hidden(growth.grow_ffn(growth.stack(moments, old, s1, power), s1, s2,
                                                                power), s2, s3, power), s3, new, power)
    assert set(out) == set(manual) == {n for n, _ in BertForPreTraining(new).named_parameters()}
    for name in out:
        assert torch.equal(out[name], manual[name]), name


# ------------------------------------------------------------------------------------------ EarlyBERT

def _slim_model(seed: int = 0):
    """A random slimming model: the units the ticket prunes have coefficient 0 (so pruning is exactly
    function-preserving), kept ones random in [0.25, 1.75], one of them negative."""
    c = cfg(num_heads=4, slimming=True)
    torch.manual_seed(seed)
    model = BertForPreTraining(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for i, layer in enumerate(model.bert.encoder.layer):
            head = torch.rand(4) * 1.5 + 0.25
            head[i] = 0.0  # one dead head per layer: ratio 1/4
            head[3 - i] *= -1
            layer.attention.self.head_coef.copy_(head)
            coef = torch.rand(64) * 1.5 + 0.25
            coef[i * 8: i * 8 + 20] = 0.0  # 40 of 128 dead, uneven across layers (the global ratio)
            coef[60] = 0.25  # the brief's example: weight x 1/4, gradient x 4
            layer.intermediate.neuron_coef.copy_(coef)
    return c, model.double().eval()


def test_prune_with_rewind_keep_moments_follow_the_gradients(tmp_path):
    old, model = _slim_model()
    args = {"ratio_heads": 0.25, "ratio_ffn": 40 / 128, "rewind": "keep"}
    old_grads, new_grads, paths = check_against_autograd("prune", old, old.model_copy(update={"slimming": False}),
                                                         tmp_path, model=model, ctx_args=args, resolve=True)
    # Spelled out for neuron 60 of layer 0 (c = 0.25, kept as column 60 - 20 = 40 of the pruned layer).
    name = "bert.encoder.layer.0.output.dense.weight"
    assert_close(new_grads[name][:, 40], old_grads[name][:, 60] * 4, "folded column: gradient x 1/c")
    assert_close(paths[2][name][:, 40], old_grads[name][:, 60] ** 2 * 16, "exp_avg_sq x 1/c**2")


def test_fold_slimming_moments_of_a_zero_coefficient_are_fresh():
    """c == 0: the search model's gradient of that column was identically 0 and the folded one's is not
    determined by it; its moments start at 0 rather than dividing by zero."""
    from training.stages import earlybert as eb

    c, model = _slim_model()
    heads, neurons = eb.coefficients(model)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for power in (1, 2):
        out = eb.fold_slimming(ones, c, (heads, neurons), power)
        w = out["bert.encoder.layer.0.output.dense.weight"]
        assert torch.isfinite(w).all() and not w[:, :20].any()
        torch.testing.assert_close(w[:, 60], torch.full_like(w[:, 60], 4.0 ** power))


def test_prune_with_rewind_init_carries_no_moments(tmp_path):
    old, model = _slim_model()
    hook = HOOKS["prune"]({"ratio_heads": 0.25, "ratio_ffn": 40 / 128, "rewind": "init"})
    ctx = HookContext(0, tmp_path)
    moments = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="optimizer_state: reset"):
        hook.transform(moments, old, old.model_copy(update={"slimming": False}), 1, ctx)


# ------------------------------------------------------------------------------------------ CoRe

def test_core_refine_copies_moments_and_drops_the_factors(tmp_path):
    """With the attention unchanged (the FFN refined alone, function-preserving) every copied tensor's
    gradient is exactly the old one: x 1, what the moment path does. The full FFN weights have no rule
    (the factors' gradients V^T G, G U^T do not give G): dropped from both moments, fresh state. With
    the attention switched to softmax (the real hook) nothing is exact; the copies are the promise."""
    relaxed = cfg(attention="linear", ffn_rank=8, nsp=True)
    same_attention = relaxed.model_copy(update={"ffn_rank": None})
    ctx = HookContext(0, tmp_path)
    model = random_model(relaxed)
    new_model = transformed("core_refine", relaxed, same_attention, model, ctx)
    b = batch(relaxed.vocab_size)
    old_grads, new_grads = gradients(model, b), gradients(new_model, b)
    ffn = {n for n in new_grads if ".intermediate.dense." in n or (".output.dense." in n and "attention" not in n)}
    assert len(ffn) == 4 * relaxed.num_layers
    full = relaxed.model_copy(update={"attention": "sdpa", "ffn_rank": None})
    for target in (same_attention, full):
        for power, moments in moment_paths("core_refine", relaxed, target, old_grads, ctx).items():
            assert set(moments) == set(new_grads) - ffn
            for name, t in moments.items():
                if target is same_attention:
                    assert_close(t, new_grads[name] ** power, f"core_refine moment {power} {name}")
                assert torch.equal(t, old_grads[name] ** power)
    # The weights path still builds the product (moment 0 is the weights, not exp_avg).
    w = core.refine_ffn({k: v.detach() for k, v in model.state_dict().items()}, relaxed, full)
    assert w["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)


# ------------------------------------------------------------------------------------------ the runner


