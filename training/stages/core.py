"""CoRe, coarse-refined training (Yang et al. 2020, arXiv 2011.13633): the `core_refine` stage hook.

Phase 1 trains a *relaxed* BERT: linear attention (Katharopoulos et al. 2020, phi(x) = elu(x) + 1, same
Q/K/V/O projections and heads; `model.attention: linear`) and a rank-r factorised FFN
(`model.ffn_rank: r`, the shipped configs use r = hidden/4). Both choices are ours: the paper does not
publish its exact operators (see METHODS.md section 3, beside the repository in ../shared).

Phase 2 (`hook: core_refine`) turns it into the original BERT in the running job:

* every tensor except the FFN factors is copied unchanged (Q/K/V/O, LayerNorms, embeddings, heads);
* each factorised FFN matrix becomes the product of its factors. The relaxed Linear pair computes
  x -> dense_v(dense_u(x)) = x U^T V^T + b_v, so the full torch Linear gets
  `dense.weight = dense_v.weight @ dense_u.weight` ([out, r] @ [r, in]) and `dense.bias = dense_v.bias`
  (dense_u has no bias): the refined FFN computes exactly what the factorised one did;
* attention becomes softmax attention (whatever softmax backend the stage declares: sdpa, eager, fused).
  This changes the function: the refine phase retrains for far fewer steps.

Optimizer state (`optimizer_state: carry`): every copied parameter keeps its Adam/LAMB moments,
unscaled. Moments follow the gradients (see growth.py), and there is no exact gradient rule here: the
switch to softmax attention changes the function, so every gradient changes; copying is the documented
option (with the attention unchanged, refining only the FFN, the copied tensors' gradients are exactly
the old ones: tests/unit/test_moments.py). The moments of the factors say nothing about the moments of their
product (the factors' gradients are V^T G and G U^T of the product's G, which cannot be inverted), so
the new full FFN weights start with fresh state: the moment transforms (moment 1 and 2) drop them, and
`transfer.load_into_engine` installs state only for a parameter present in both exp_avg and exp_avg_sq.

`python -m training.stages.core --config C` prints each stage's parameter count and training FLOPs
per token (training.model.flops), relaxed vs full.
"""
from __future__ import annotations

import argparse
import sys

import torch

from training.model import params
from training.model.config import ModelConfig
from training.stages.protocol import Hook, HookContext, Tensors, Transition

# Everything but ModelConfig.RELAXED_FIELDS must agree between the relaxed and the refined model; regularisation
# (REGULARISATION_FIELDS) may change at the boundary (e.g. no dropout in the short refine phase).


def is_relaxed(cfg: ModelConfig) -> bool:
    return cfg.attention == "linear" or cfg.ffn_rank is not None


def relaxed_config(cfg: ModelConfig, rank: int | None = None) -> ModelConfig:
    """The CoRe relaxed counterpart of a full model: linear attention and a rank-r FFN (default hidden/4)."""
    rank = rank if rank is not None else max(1, cfg.hidden_size // 4)
    return cfg.model_copy(update={"attention": "linear", "ffn_rank": rank})


def _validate(old: ModelConfig, new: ModelConfig) -> None:
    if not is_relaxed(old):
        raise ValueError("the previous stage must be the relaxed model (model.attention: linear and/or "
                         "model.ffn_rank set); it is already full-rank softmax BERT")
    if is_relaxed(new):
        raise ValueError(f"the refined stage must be full-rank softmax BERT (attention {new.attention!r}, "
                         f"ffn_rank {new.ffn_rank!r}); set model.attention: sdpa and model.ffn_rank: null")
    diffs = old.describe_diff(new, ignore=(*ModelConfig.RELAXED_FIELDS, *ModelConfig.REGULARISATION_FIELDS))
    if diffs:
        raise ValueError(f"refining keeps the shape (hidden, layers, heads, ffn, ...); changed: {diffs}")


def _ffn_prefixes(cfg: ModelConfig) -> list[str]:
    return [params.layer_name(i, f"{part}.") for i in range(cfg.num_layers) for part in ("intermediate", "output")]


def refine_ffn(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 0) -> Tensors:
    """Low-rank FFN factors -> full FFN weights (W = V U, bias from dense_v); other tensors pass through.

    moment 0 (weights): the product. moment 1 or 2 (exp_avg, exp_avg_sq): the FFN entries are dropped, so
    the new full weights start with fresh optimizer state; the other moments pass through (x 1).
    """
    if old.ffn_rank is None:
        return dict(tensors)
    out = dict(tensors)
    for prefix in _ffn_prefixes(old):
        u_key, v_key, vb_key = prefix + "dense_u.weight", prefix + "dense_v.weight", prefix + "dense_v.bias"
        u, v, vb = out.pop(u_key, None), out.pop(v_key, None), out.pop(vb_key, None)
        if moment != 0:
            continue
        if u is not None and v is not None:
            # fp64 accumulation: the product of fp32 factors, rounded once.
            out[prefix + "dense.weight"] = (v.double() @ u.double()).to(v.dtype)
        if vb is not None:
            out[prefix + "dense.bias"] = vb.clone()
    return out


class CoreRefine(Hook):
    """The relaxed model (linear attention, low-rank FFN) becomes full BERT: the FFN factors are multiplied."""
    name = "core_refine"

    def validate(self, t: Transition) -> None:
        _validate(t.old, t.new)

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        return refine_ffn(tensors, old, new, moment)


# ------------------------------------------------------------------------------------------ reporting

def model_cost(cfg: ModelConfig, seq_len: int) -> dict:
    """Parameters (tied weights once) and training FLOPs per token; the model is built on the meta device."""
    from training.model.bert import BertForPreTraining
    from training.model.flops import count_parameters, flops_per_token

    with torch.device("meta"):
        model = BertForPreTraining(cfg.model_copy(update={"init_from_hf": None}))
    return {"params": count_parameters(model), "flops_per_token": flops_per_token(cfg, seq_len)}


def describe(run_cfg, seq_len: int | None = None) -> list[str]:
    """One line per stage, plus the relaxed counterpart of the final model when no stage is relaxed."""
    seq = seq_len or run_cfg.model.max_position
    lines, full = [], model_cost(run_cfg.model.model_copy(update={"attention": "sdpa", "ffn_rank": None}), seq)
    lines.append(f"full BERT (seq {seq}): {full['params']:,} params, {full['flops_per_token'] / 1e6:,.1f} MFLOP/token")
    configs = [(s.name, run_cfg.stage_model(i), s.seq_len or seq) for i, s in enumerate(run_cfg.stages)]
    if not any(is_relaxed(c) for _, c, _ in configs):
        configs.append(("(relaxed, r=hidden/4)", relaxed_config(run_cfg.model), seq))
    for name, cfg, stage_seq in configs:
        cost = model_cost(cfg, stage_seq)
        kind = "relaxed" if is_relaxed(cfg) else "full"
        lines.append(f"stage {name}: {kind} (attention {cfg.attention}, ffn_rank {cfg.ffn_rank}, seq {stage_seq}): "
                     f"{cost['params']:,} params ({cost['params'] / full['params']:.1%}), "
                     f"{cost['flops_per_token'] / 1e6:,.1f} MFLOP/token "
                     f"({cost['flops_per_token'] / full['flops_per_token']:.1%})")
    return lines


def main(argv=None) -> int:
    from training.config import read_config
    from training.errors import UserError

    p = argparse.ArgumentParser(prog="python -m training.stages.core",
                                description="Parameters and FLOPs/token of CoRe's relaxed vs full BERT")
    p.add_argument("--config", required=True)
    p.add_argument("--seq-len", type=int, default=None, help="default: model.max_position")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = read_config(args.config, args.set)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(describe(cfg, args.seq_len)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
