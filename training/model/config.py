"""The model's shape and variant: a typed, validated config (unknown keys are errors)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int = 1024
    max_position: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
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
    # Per-layer head counts / FFN sizes after structured pruning (EarlyBERT); None means uniform.
    heads_per_layer: Optional[list[int]] = None
    ffn_per_layer: Optional[list[int]] = None
    # CoRe relaxed FFN: W = U V with this rank; None means a full-rank FFN.
    ffn_rank: Optional[int] = None
    # EarlyBERT network slimming: a coefficient (init 1) per attention head (attention.self.head_coef)
    # and per FFN neuron (intermediate.neuron_coef); training adds slimming_l1 * sum|c| to the loss.
    slimming: bool = False
    slimming_l1: float = 1e-4
    # Start from a Hugging Face BERT checkpoint directory; its config.json then sets the shape.
    init_from_hf: Optional[str] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_heads(self, i: int) -> int:
        return self.heads_per_layer[i] if self.heads_per_layer is not None else self.num_heads

    def layer_ffn(self, i: int) -> int:
        return self.ffn_per_layer[i] if self.ffn_per_layer is not None else self.ffn_size

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("heads_per_layer", "ffn_per_layer"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != self.num_layers:
                raise ValueError(f"model.{name} has {len(per_layer)} entries for {self.num_layers} layers")
        if self.heads_per_layer is not None and any(h < 1 or h > self.num_heads for h in self.heads_per_layer):
            raise ValueError(f"model.heads_per_layer entries must be in [1, num_heads={self.num_heads}]")
        if self.slimming_l1 < 0:
            raise ValueError(f"model.slimming_l1 must be >= 0, got {self.slimming_l1}")
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
