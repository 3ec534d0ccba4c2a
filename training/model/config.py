"""The model's shape and variant: a typed, validated config (unknown keys are errors)."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError


# ------------------------------------------------------------------------------------------ domains
# Every number in the run config (this model and training/config.py) has its domain in the schema: the
# bounds are pydantic constraints (they show in the JSON schema), floats are finite (no NaN, no inf), and
# a value outside gets ONE message naming the whole domain: `<dotted.field> must be <domain>, got <value>`.

def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(kind: type, gt=None, ge=None, lt=None, le=None) -> str:
    low, high = (gt if gt is not None else ge), (lt if lt is not None else le)
    if low is not None and high is not None:
        return (f"in {'(' if gt is not None else '['}{_bound(low)}, {_bound(high)}"
                f"{')' if lt is not None else ']'}")
    if gt == 0:
        return "positive" if kind is int else "positive and finite"
    bounds = ((">", gt), (">=", ge), ("<", lt), ("<=", le))
    text = " and ".join(f"{op} {_bound(v)}" for op, v in bounds if v is not None)
    if kind is int:
        return text or "an integer"
    return f"a finite number {text}".strip()


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, on one line, cut to `limit` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def domain(kind: type, *, gt=None, ge=None, lt=None, le=None):
    """`kind` (int or float) restricted to the given bounds; floats also to finite values; bools refused.

    Use as a field's type: `lr: domain(float, gt=0) = 2e-3`, or via the aliases below.
    """
    constraints = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le).items() if v is not None}
    if kind is float:
        constraints["allow_inf_nan"] = False
    text = _describe(kind, gt, ge, lt, le)
    what = "an integer" if kind is int else "a number"

    def check(value, handler):
        if isinstance(value, bool):  # True is an int to Python, never a step count or a rate to us
            raise PydanticCustomError("domain", "must be {domain}, got {got}", {"domain": what, "got": shown(value)})
        try:
            return handler(value)
        except ValidationError as err:
            parsing = any(e["type"].startswith(("int_", "float_")) for e in err.errors())
            raise PydanticCustomError("domain", "must be {domain}, got {got}",
                                      {"domain": what if parsing else text, "got": shown(value)}) from None

    return Annotated[kind, Field(**constraints), WrapValidator(check)]


PositiveFloat = domain(float, gt=0)
NonNegativeFloat = domain(float, ge=0)
PositiveInt = domain(int, gt=0)
NonNegativeInt = domain(int, ge=0)
DropoutRate = domain(float, ge=0, lt=1)  # 1 would drop everything (and divide by 1 - p = 0)


def check_seq_len(seq_len: int, max_position: int, what: str = "seq_len") -> None:
    """Whether rows of `seq_len` tokens fit a position table of `max_position` rows: the one place this is
    decided (the config's stages, the prepared data, the model's forward ask here). ValueError otherwise."""
    if not 0 < seq_len <= max_position:
        raise ValueError(f"{what} {seq_len} exceeds model.max_position {max_position}")


def check_locality(attention: str) -> None:
    """Whether an attention backend takes the additive locality bias (training/model/ops.py locality_bias)."""
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"locality_bias needs model.attention eager or sdpa, not {attention}")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    vocab_size: PositiveInt = 8192
    hidden_size: PositiveInt = 256
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    ffn_size: PositiveInt = 1024
    max_position: PositiveInt = 512
    type_vocab_size: PositiveInt = 2
    pad_token_id: NonNegativeInt = 0  # and < vocab_size (checked below)
    dropout: DropoutRate = 0.1
    attention_dropout: DropoutRate = 0.1
    # > 0: LayerNorm divides by sqrt(var + eps), and a constant row (var 0) is not rare in fp16/bf16.
    layer_norm_eps: PositiveFloat = 1e-12
    # > 0: the std of the initial weights; 0 would start every weight equal (no symmetry breaking).
    initializer_range: PositiveFloat = 0.02
    # The position table's initial values: "normal" N(0, initializer_range) as HF; "sinusoidal" the sine/cosine
    # table scaled to the same std (still learned, still exports to HF). Only the init differs.
    position_init: Literal["normal", "sinusoidal"] = "normal"
    # "post": LayerNorm after each residual add, as Hugging Face BERT. "pre": LayerNorm before each
    # sub-layer plus a final LayerNorm (needed by progressive layer dropping).
    norm: Literal["post", "pre"] = "post"
    # eager: reference math; sdpa: torch scaled_dot_product_attention; fused: Triton kernels in kernels/
    # (falls back to sdpa with a logged reason); linear: elu+1 linear attention (CoRe's relaxed model).
    attention: Literal["eager", "sdpa", "fused", "linear"] = "sdpa"
    # Triton kernels (kernels/) for the other hot spots, each falling back to the PyTorch path with a logged
    # reason where it cannot run: bias_gelu (FFN and MLM-head GeLU with its bias add), residual_layernorm
    # (post-LN add + dropout + LayerNorm), mlm_loss (vocab projection + cross-entropy without the logits).
    fused_ops: list[Literal["bias_gelu", "residual_layernorm", "mlm_loss"]] = []
    nsp: bool = False
    # torch.compile (inductor) each encoder layer in place (training/model/compiled.py): the layers are where
    # the time goes, compiling them one by one keeps layer drop, MSLT's frozen prefix and growth in Python,
    # and parameter names stay as they are. Compilation happens in the first step of each stage (logged).
    compile: bool = False
    # A batch with padding (not packed pre-training rows: `prepare --no-pack`, fine-tuning-style data) computes
    # its loss on its real tokens only (training/model/unpad.py): gathered once before the encoder. Hidden
    # states and logits (no labels) keep every position, padding included, as Hugging Face's do.
    unpad: bool = True
    # Per-layer head counts / FFN sizes after structured pruning (EarlyBERT); None means uniform.
    heads_per_layer: Optional[list[PositiveInt]] = None
    ffn_per_layer: Optional[list[PositiveInt]] = None
    # CoRe relaxed FFN: W = U V with this rank; None means a full-rank FFN.
    ffn_rank: Optional[PositiveInt] = None
    # EarlyBERT network slimming: a coefficient (init 1) per attention head (attention.self.head_coef)
    # and per FFN neuron (intermediate.neuron_coef); training adds slimming_l1 * sum|c| to the loss.
    slimming: bool = False
    slimming_l1: NonNegativeFloat = 1e-4  # 0: the coefficients train without the L1 pull
    # Start from a Hugging Face BERT checkpoint directory; its config.json then sets the shape.
    init_from_hf: Optional[str] = None
    # Model add-ons by name, with their arguments (training/model/addons.py: methods that add parameters; EarlyBERT's
    # slimming is one, switched by `slimming` above). Names are checked against the registry by the model and when
    # the config loads (stages/plan.check_stages).
    addons: dict[str, dict[str, Any]] = {}

    # Field groups: every module that asks which fields a change may touch asks these (and diff) instead of
    # keeping its own list.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (  # decide the tensors' shapes: a checkpoint loads only if they agree
        "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position", "type_vocab_size",
        "norm", "nsp", "heads_per_layer", "ffn_per_layer", "ffn_rank", "slimming", "addons")
    PER_LAYER_FIELDS: ClassVar[tuple[str, ...]] = ("heads_per_layer", "ffn_per_layer")  # one entry per layer
    REGULARISATION_FIELDS: ClassVar[tuple[str, ...]] = ("dropout", "attention_dropout")  # free between stages
    RELAXED_FIELDS: ClassVar[tuple[str, ...]] = ("attention", "ffn_rank")  # what CoRe's relaxed model changes

    def diff(self, other: "ModelConfig", ignore=()) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, name -> (mine, other's), in declaration order, less `ignore`."""
        return {k: (getattr(self, k), getattr(other, k)) for k in type(self).model_fields
                if k not in ignore and getattr(self, k) != getattr(other, k)}

    def describe_diff(self, other: "ModelConfig", ignore=()) -> str:
        """`field a -> b, ...`: the diff as error messages print it."""
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.diff(other, ignore).items())

    def check_seq_len(self, seq_len: int, what: str = "seq_len") -> None:
        check_seq_len(seq_len, self.max_position, what)

    def check_layer_drop(self) -> None:
        """Progressive layer dropping needs Pre-LN layers: with Post-LN a skipped layer would also skip its
        LayerNorms and the residual stream would change scale."""
        if self.norm != "pre":
            raise ValueError(f"layer_drop needs model.norm: pre, got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_heads(self, i: int) -> int:
        return self.heads_per_layer[i] if self.heads_per_layer is not None else self.num_heads

    def layer_ffn(self, i: int) -> int:
        return self.ffn_per_layer[i] if self.ffn_per_layer is not None else self.ffn_size

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        # Single-field domains are in the types above; what is checked here relates fields.
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"model.pad_token_id must be in [0, model.vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        for name in ("heads_per_layer", "ffn_per_layer"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != self.num_layers:
                raise ValueError(f"model.{name} has {len(per_layer)} entries for {self.num_layers} layers")
        if self.heads_per_layer is not None and any(h < 1 or h > self.num_heads for h in self.heads_per_layer):
            raise ValueError(f"model.heads_per_layer entries must be in [1, num_heads={self.num_heads}]")
        if "residual_layernorm" in self.fused_ops and self.norm != "post":
            raise ValueError("model.fused_ops: residual_layernorm fuses the post-LN residual; it needs model.norm: post")
        if self.ffn_rank is not None and not 0 < self.ffn_rank <= min(self.hidden_size, self.ffn_size):
            raise ValueError(f"model.ffn_rank must be in [1, {min(self.hidden_size, self.ffn_size)}]")
        return self

    # An MLM-only model (nsp false) carries the pooler (bert.pooler.dense) of its `init_from_hf` checkpoint
    # untrained, so the HF export writes it back as imported (not freshly drawn). Set by the run when the
    # checkpoint has one. It is held as fp32 buffers: no optimizer, no bf16 cast, no gradient touches it.
    carry_pooler: bool = False

    @model_validator(mode="after")
    def _check_carry_pooler(self) -> "ModelConfig":
        if self.carry_pooler and self.nsp:
            raise ValueError("model.carry_pooler is for nsp: false models; with nsp the pooler is trained")
        if self.carry_pooler and not self.init_from_hf:
            raise ValueError("model.carry_pooler needs model.init_from_hf (it carries that checkpoint's pooler)")
        return self
