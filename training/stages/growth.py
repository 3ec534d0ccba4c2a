"""Model-growth operators: progressive stacking (Gong et al. 2019) and CompoundGrow (Gu et al. 2021).

Every operator is a pure function on a name -> tensor dict,

    op(tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> dict[str, Tensor]

and the runner applies the *same* operator to the model state dict (moment=0), to the optimizer's
`exp_avg` (moment=1) and to its `exp_avg_sq` (moment=2): the tensors are copied/tiled alike, but the
scale differs. Inputs are never modified; tensors an operator does not change are passed through (same
object), new copies are fresh tensors. Keys are Hugging Face BertForPreTraining names; any subset works
(a state dict has the tied `cls.predictions.decoder.*` keys, `named_parameters()` does not) and the
result has exactly the keys of the grown model.

Optimizer moments follow the gradients, not the weights. Each operator knows, per tensor, the factor g
its gradient gets on the grown model (measured with autograd in tests/unit/test_moments.py); `exp_avg` is
multiplied by g and `exp_avg_sq` by g**2, so the carried moments are what the grown model's own gradients
would have accumulated. For the width operators the weight's factor and the gradient's differ:

* a Linear whose *input* axis is tiled sums k copies of each input, so its weight is divided by k, but
  each entry still sees the same input and the same output gradient: g = 1 (e.g. output.dense after
  grow_ffn);
* a tensor whose *output* axis is tiled feeds k copies of a unit, and the k copies share that unit's
  gradient (their sum is what the next layer reads): g = 1/k (e.g. intermediate.dense after grow_ffn,
  weight unchanged; in grow_hidden every LayerNorm, embedding table and hidden-output Linear);
* grow_hidden's MLM-transform LayerNorm (gamma, beta divided by k for the tied decoder) scales its
  output by 1/k, so its gradient gets k times more: g = k * 1/k = 1.

Scaling the moments like the weights instead (m x s, v x s**2) leaves m/sqrt(v) right at the boundary,
but the next gradients arrive at the g scale: Adam/LAMB steps on those tensors are off by k for about
1/(1 - beta2) steps, until v has forgotten the carried value.

Operators and what they preserve:

* `stack`       depth L -> n*L: new layer i is a copy of old layer i % L. Not function-preserving, so no
                gradient rule exists for the copies: their moments are copies of the source layer's,
                unscaled (`optimizer_state: carry`; the stacking authors' unused copy option).
* `grow_ffn`    FFN inner size x k, Net2Net tiling: exactly function-preserving; exact gradient rule.
* `grow_hidden` hidden size x k with heads x k (head_dim fixed): exactly function-preserving; exact
                gradient rule.
* `grow_seq`    longer position table (rows copied cyclically); the function on positions below the
                old max_position is unchanged, and so are those rows' gradients (g = 1). The new rows
                get no gradient until a longer batch reaches them, so no rule exists for them: their
                moments are copied cyclically like the weights (trained statistics rather than zeros:
                with zeros and a late step count Adam's first step there is (1 - beta1)/sqrt(1 - beta2),
                about 3x the learning rate, in the gradient's sign).
* `compose(kinds)` / `grow`: several at once, always in the order of KINDS; each step's rule applies.

Widening convention: new unit j of a grown axis is a copy of old unit j % d ("tile", torch.repeat).
Tiling, not interleaving, is what keeps attention heads whole: Q/K/V rows are laid out head by head,
so tiling the [H*head_dim] axis makes new head h an exact copy of old head h % H. A Linear whose
*input* axis is tiled sums over k copies of each input, so its weight is divided by k.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Iterable, Optional, Union

import torch

from training.model import params
from training.model.config import ModelConfig
from training.stages.protocol import Hook, HookContext, Transition

Tensors = dict[str, torch.Tensor]
KINDS = ("hidden", "ffn", "stack", "seq")  # the fixed order compose()/grow() applies them in

# Config fields no growth operator can change (they fix a parameter's meaning or a head's shape).
_FIXED = ("vocab_size", "type_vocab_size", "pad_token_id", "norm", "nsp", "ffn_rank", "layer_norm_eps", "slimming",
          "addons")
# Shape fields, and which growth kinds may change each.
_MAY_CHANGE = {
    "hidden_size": {"hidden"}, "num_heads": {"hidden"}, "heads_per_layer": {"hidden", "stack"},
    "ffn_size": {"ffn"}, "ffn_per_layer": {"ffn", "stack"}, "num_layers": {"stack"},
    "max_position": {"seq"},
}

# A tensor's axes (which are the hidden size H, the attention width A, the FFN's neurons F; lower case the
# input axis of a Linear, where tiling means a k-fold sum, hence the 1/k) are training/model/params.py's answer.
_WIDENED = ("H", "A", "F")


# ------------------------------------------------------------------------------------ validation

def _factor(field: str, a: int, b: int) -> int:
    if b < a:
        raise ValueError(f"model.{field} cannot shrink in a growth stage ({a} -> {b})")
    if b % a:
        what = "a multiple of the current depth" if field == "num_layers" else "an integer factor"
        raise ValueError(f"model.{field} must grow by {what} ({a} -> {b} is x{b / a:g})")
    return b // a


def _per_layer(values: Optional[list[int]], factor: int, repeats: int) -> Optional[list[int]]:
    """What a per-layer list (pruned heads/FFN) becomes: every entry x factor, the list repeated."""
    return None if values is None else [v * factor for v in values] * repeats


def _kinds(kind: Union[str, Iterable[str]]) -> tuple[str, ...]:
    kinds = KINDS if kind == "compound" else (kind,) if isinstance(kind, str) else tuple(kind)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown growth kind {unknown or kind!r}; expected one of {KINDS} or 'compound'")
    return tuple(k for k in KINDS if k in kinds)


def validate_growth(kind: Union[str, Iterable[str]], old: ModelConfig, new: ModelConfig,
                    seq_len: Optional[int] = None) -> None:
    """Raise ValueError (one line) unless `old -> new` is a growth the named operator(s) can do.

    kind: "hidden", "ffn", "stack", "seq", a list of them, or "compound" (any combination).
    seq_len: the sequence length the grown model will train on; must fit new.max_position.
    """
    kinds = _kinds(kind)
    label = "+".join(kinds)
    for tag, cfg in (("old", old), ("new", new)):  # configs built with model_copy skip validation
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"{tag} model.hidden_size ({cfg.hidden_size}) is not divisible by "
                             f"model.num_heads ({cfg.num_heads})")
    for field in _FIXED:
        if getattr(old, field) != getattr(new, field):
            raise ValueError(f"{label} growth cannot change model.{field} "
                             f"({getattr(old, field)!r} -> {getattr(new, field)!r})")
    if (old.attention == "linear") != (new.attention == "linear"):
        raise ValueError("growth cannot switch between linear and softmax attention "
                         "(that is CoRe's transform)")
    for field, allowed in _MAY_CHANGE.items():
        if getattr(old, field) != getattr(new, field) and not allowed & set(kinds):
            raise ValueError(f"{label} growth cannot change model.{field} "
                             f"({getattr(old, field)!r} -> {getattr(new, field)!r})")

    kh = _factor("hidden_size", old.hidden_size, new.hidden_size)
    kf = _factor("ffn_size", old.ffn_size, new.ffn_size)
    reps = _factor("num_layers", old.num_layers, new.num_layers)
    if new.max_position < old.max_position:
        raise ValueError(f"model.max_position cannot shrink ({old.max_position} -> {new.max_position})")
    if new.num_heads != kh * old.num_heads:
        # Heads must grow with the width: head_dim fixed keeps the 1/sqrt(head_dim) softmax scale and
        # makes each new head an exact copy of an old one. A wider head_dim changes every score.
        raise ValueError(f"hidden growth x{kh} keeps head_dim {old.head_dim}: model.num_heads must be "
                         f"{kh * old.num_heads}, got {new.num_heads}")
    for field, factor in (("heads_per_layer", kh), ("ffn_per_layer", kf)):
        expected = _per_layer(getattr(old, field), factor, reps)
        if getattr(new, field) != expected:
            raise ValueError(f"model.{field} must become {expected} (x{factor}, repeated x{reps}), "
                             f"got {getattr(new, field)}")
    single = {"hidden": kh, "ffn": kf, "stack": reps}
    if len(kinds) == 1 and single.get(kinds[0]) == 1:
        raise ValueError(f"{kinds[0]} growth: nothing to grow (old and new model have the same size)")
    if seq_len is not None:
        check_seq_len(seq_len, new)


def check_seq_len(seq_len: int, cfg: ModelConfig) -> None:
    if not 0 < seq_len <= cfg.max_position:
        raise ValueError(f"sequence length {seq_len} does not fit model.max_position {cfg.max_position}")


# ------------------------------------------------------------------------------------ operators

def _roles(name: str) -> tuple[str, ...]:
    """The axes of tensor `name` (params.describe). Failing beats silently leaving an unknown parameter at its
    old width: a name the model does not have, or an axis no growth rule widens (a per-head add-on tensor)."""
    try:
        axes = params.describe(name).axes
    except ValueError:
        raise ValueError(f"no growth rule for tensor {name!r}") from None
    if any(a.upper() not in _WIDENED for a in axes if a):
        raise ValueError(f"no growth rule for tensor {name!r} (axes {axes})")
    return axes


def _is_head_layernorm(name: str) -> bool:
    """The MLM transform's LayerNorm, which feeds the tied decoder (see grow_hidden)."""
    param = params.describe(name)
    return param.part == "mlm_transform" and "LayerNorm" in param.role


def _widen(tensors: Tensors, factors: dict[str, int], moment: int,
           extra_divisor: Callable[[str], int] = lambda name: 1) -> Tensors:
    """Tile every axis whose role is in `factors` by its factor, then scale: the width rule, once.

    Per tensor, with `fan_in` the product of k over its tiled input (lower-case) axes, `copies` that over
    its tiled output (upper-case) axes and `extra = extra_divisor(name)` (a divisor that scales the
    tensor's output, see grow_hidden):
        weight (moment 0)          W / (fan_in * extra)
        gradient                   g = extra / copies  (a copy gets 1/k of the unit's gradient; a tensor
                                   whose output is scaled by 1/extra gets extra times the gradient)
        moment m (1: exp_avg, 2: exp_avg_sq)   M * g**m
    Divides by integers (t / k**m) rather than multiplying by 1/k: bit-identical to the textbook formula
    W / k, which the tests compare against exactly."""
    out = {}
    for name, t in tensors.items():
        roles = _roles(name)
        if len(roles) != t.dim():
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {len(roles)} dims")
        fan_in = copies = 1
        for axis, role in enumerate(roles):
            k = factors.get(role.upper(), 1)
            if k > 1:
                t = t.repeat(*(k if a == axis else 1 for a in range(t.dim())))
                if role.islower():
                    fan_in *= k
                else:
                    copies *= k
        extra = extra_divisor(name)
        if moment == 0:
            num, den = 1, fan_in * extra
        else:
            g = Fraction(extra, copies) ** moment
            num, den = g.numerator, g.denominator
        if num != 1:
            t = t * num
        out[name] = t / den if den != 1 else t
    return out


def grow_ffn(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
    """FFN inner size x k (Net2Net, as the CompoundGrow authors' code), exactly function-preserving.

    intermediate.dense [F, H] -> [kF, H]: rows tiled (W1'[i] = W1[i % F]), bias tiled, so the k
    copies of each inner neuron compute the same activation. output.dense [H, F] -> [H, kF]: columns
    tiled and divided by k (W2'[:, j] = W2[:, j % F] / k), so the k copies sum back to one. b2 as is.
    Gradients (hence moments, see the module doc): W1 and b1 rows x 1/k (each copy gets 1/k of the
    neuron's gradient), W2 columns x 1 (weight / k, same input, same output gradient), the rest x 1.
    """
    validate_growth("ffn", old, new)
    return _widen(tensors, {"F": new.ffn_size // old.ffn_size}, moment)


def grow_hidden(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
    """Hidden size x k, heads x k (head_dim fixed), exactly function-preserving.

    The hidden state h becomes tile(h, k) everywhere:
    * embeddings tiled (a lookup has no fan-in to divide) -> their sum is tile(sum);
    * LayerNorm of tile(x) has tile(x)'s mean and variance = x's, so gamma/beta are just tiled;
    * every Linear tiles its output axis (and bias) and divides its tiled input axis by k;
    * Q/K/V tile by head: new head h = old head h % H, same head_dim, same softmax scale, same
      probabilities; the context is tile(context) and attention.output.dense reads it with 1/k.
    The one conflict is the tied decoder: as the word embedding it must be tile(E) (no 1/k), but as
    the vocab projection tile(E) . tile(t) = k * (E . t). Dividing the embedding by k instead would be
    absorbed by the embedding LayerNorm only up to its eps. So the 1/k goes on the MLM transform's
    LayerNorm gamma and beta (the decoder's input): exact, at the cost of that LN's affine starting
    at gamma/k instead of gamma. Pooler and NSP head follow the Linear rule.
    Gradients (hence moments, see the module doc): x 1/k for every tensor with a tiled output axis
    (embeddings, LayerNorms, Q/K/V, dense outputs on H or A, biases on them; the tied word embedding /
    decoder weight both as a table and as the vocab projection of the 1/k-scaled transform output),
    x 1 for the MLM-transform LayerNorm (its output is scaled by 1/k), the vocab bias, the NSP head and
    the low-rank factors whose output is not widened.
    """
    validate_growth("hidden", old, new)
    k = new.hidden_size // old.hidden_size
    return _widen(tensors, {"H": k, "A": k}, moment,
                  extra_divisor=lambda name: k if _is_head_layernorm(name) else 1)


def stack(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
    """Depth L -> n*L (progressive stacking): new layer i is a copy of old layer i % L, so the whole
    stack is copied on top, in order. Everything else unchanged. Not function-preserving, so the new
    layers' gradients have no rule in terms of the old ones: moments are copied like weights, unscaled
    (`optimizer_state: carry`; the authors' unused copy option), whatever `moment`; copies are fresh
    tensors, never views of their source."""
    validate_growth("stack", old, new)
    out = {}
    for name, t in tensors.items():
        i = params.describe(name).layer
        if i is None:
            out[name] = t
            continue
        if i >= old.num_layers:
            raise ValueError(f"tensor {name!r} is beyond the old model's {old.num_layers} layers")
        for j in range(i, new.num_layers, old.num_layers):
            out[params.renumbered(name, j)] = t if j == i else t.clone()
    return out


def grow_seq(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
    """Input-length growth. The position table is shared across stages, so a longer seq_len needs no
    weight change while it fits max_position (check with `check_seq_len`). A larger max_position
    extends the table with the old rows copied cyclically (row p = old row p % old_max): the learned
    rows keep their values and the new rows start from trained statistics rather than noise. Moments
    are copied the same way, unscaled, whatever `moment`: the old rows' gradients are unchanged
    (g = 1), the new rows have no gradient rule (none reaches them until a longer batch does)."""
    validate_growth("seq", old, new)
    out = dict(tensors)
    if new.max_position > old.max_position:
        for name, t in tensors.items():
            if name == params.POSITION_EMBEDDINGS:
                rows = torch.arange(new.max_position, device=t.device) % old.max_position
                out[name] = t.index_select(0, rows)
    return out


_OPS = {"hidden": grow_hidden, "ffn": grow_ffn, "stack": stack, "seq": grow_seq}


def _steps(old: ModelConfig, new: ModelConfig, kinds: tuple[str, ...]):
    """(kind, from, to) for each kind that changes something, one field group per step."""
    kh, kf = new.hidden_size // old.hidden_size, new.ffn_size // old.ffn_size
    cur = old
    for kind in kinds:
        if kind == "hidden":
            update = dict(hidden_size=new.hidden_size, num_heads=new.num_heads,
                          heads_per_layer=_per_layer(cur.heads_per_layer, kh, 1))
        elif kind == "ffn":
            update = dict(ffn_size=new.ffn_size, ffn_per_layer=_per_layer(cur.ffn_per_layer, kf, 1))
        elif kind == "stack":
            update = dict(num_layers=new.num_layers, heads_per_layer=new.heads_per_layer,
                          ffn_per_layer=new.ffn_per_layer)
        else:
            update = dict(max_position=new.max_position)
        nxt = cur.model_copy(update=update)
        if nxt != cur:
            yield kind, cur, nxt
        cur = nxt


def compose(kinds: Union[str, Iterable[str]]):
    """One operator doing several growths at once (CompoundGrow). Whatever order `kinds` lists, they
    run in KINDS order: widen (hidden, then FFN) before stacking, so only the L old layers are
    widened and the copies are made from the widened layers; the position table last. Widening and
    stacking commute, so the order changes cost, not the result. Kinds whose size is unchanged are
    skipped."""
    kinds = _kinds(kinds)

    def op(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
        validate_growth(kinds, old, new)
        for kind, a, b in _steps(old, new, kinds):
            tensors = _OPS[kind](tensors, a, b, moment)
        return tensors

    return op


grow = compose(KINDS)  # any combination of depth, FFN, hidden and position-table growth


# ------------------------------------------------------------------------------------------ the hooks

class _Growth(Hook):
    """A growth operator of this module (`kinds`: one of its kinds, or several applied together)."""
    kinds: tuple[str, ...] | str

    def validate(self, t: Transition) -> None:
        validate_growth(self.kinds, t.old, t.new)

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        op = compose(self.kinds) if isinstance(self.kinds, tuple) else grow
        return op(tensors, old, new, moment=moment)


class Stack(_Growth):
    name, kinds = "stack", "stack"


class GrowFfn(_Growth):
    name, kinds = "grow_ffn", "ffn"


class GrowHidden(_Growth):
    name, kinds = "grow_hidden", "hidden"


class GrowWidth(_Growth):
    name, kinds = "grow_width", ("hidden", "ffn")


class Compound(_Growth):
    name, kinds = "compound", "compound"


class GrowSeq(Hook):
    """Longer sequences: the same model unless max_position grew (then the position table is extended)."""
    name = "grow_seq"

    def validate(self, t: Transition) -> None:
        stage = t.stage
        if stage.seq_len is None:
            raise ValueError("needs the stage's seq_len")
        if t.new.max_position != t.old.max_position:
            validate_growth("seq", t.old, t.new)
        elif t.old != t.new:
            raise ValueError("changes only the sequence length (and max_position)")
        if t.previous_seq_len is not None and stage.seq_len <= t.previous_seq_len:
            raise ValueError(f"must lengthen sequences ({t.previous_seq_len} -> {stage.seq_len})")

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        # Same position table unless max_position grew: shorter early stages share it.
        return grow_seq(tensors, old, new, moment=moment) if new.max_position != old.max_position else tensors
