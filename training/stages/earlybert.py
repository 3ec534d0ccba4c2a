"""EarlyBERT (Chen et al., ACL 2021): slimming coefficients, early-bird ticket search, structured pruning.

Search stage (`model: {slimming: true}`): every attention head has a coefficient scaling its context
output (`...attention.self.head_coef`, before attention.output.dense) and every FFN neuron one scaling
its post-GELU activation (`...intermediate.neuron_coef`), all initialised to 1: a model add-on
(training/model/slimming.py). In training mode the model returns `slimming_l1 * sum|c|` (lambda, default 1e-4
as the authors' scripts) as its auxiliary loss `slimming_penalty`, which the optimizer step trains on beside
the MLM loss without knowing what it is.

Ticket (`draw_ticket`): by coefficient magnitude, heads layerwise (`ratio_heads` of each layer's heads
pruned, default 1/3, at least one head kept) and FFN neurons globally (`ratio_ffn` of all neurons
pruned, default 0.4, at least one neuron per layer kept). Ties go to the lower index.

Early-bird detection (You et al. 2020; `EarlyBirdSearch`): every `interval` steps the ticket's binary
masks are drawn; the distance of two masks is the normalised Hamming distance, taken separately for
heads and neurons, the larger of the two (**our choice**: heads are too few to count in one pooled
distance). Once `window` masks are kept and the newest is within `threshold` of each of the others, the
ticket is drawn: the search stage ends there and the pruned stage starts at once, taking over the
search stage's remaining steps (the run's total steps and LR end point are unchanged; the search
stage's `steps` is its maximum). Without `search` args the search stage runs its full length.

Prune stage (`hook: prune`): `resolve` draws the ticket from the coefficients at the boundary (the same
masks the search drew: the boundary is the draw step) and sets `heads_per_layer` / `ffn_per_layer`;
`transform` folds the coefficients into the following Linear (head h's coefficient into the columns
of attention.output.dense for that head, neuron j's into column j of output.dense) and drops
slimming (**our choice**: the pruned model is a plain per-layer-sized BERT, no penalty), then cuts the
pruned rows/columns: smaller Linear layers, fewer heads (head_dim unchanged).

`rewind: init` (default, as the authors' code reloading the step-0 checkpoint) replaces the weights by
those saved at the search stage's first step (`OUT/earlybert/init.pt`, written by rank 0's search
watcher) before pruning; it needs `optimizer_state: reset` (moments of trained weights do not belong
to rewound ones). `rewind: keep` continues from the searched weights; with `optimizer_state: carry`
the moments are cut like their weights and, where a coefficient c is folded into a column, scaled like
that column's *gradient*, which folding multiplies by 1/c (exp_avg x 1/c, exp_avg_sq x 1/c**2; see
fold_slimming, and growth.py for why moments follow gradients); coefficients' own moments are dropped.

Files under OUT/earlybert/, written and read by rank 0 only: `init.pt` (rewind: init), `search.json`
(every mask drawn, so a resumed search continues exactly; entries after the resume step are ignored),
`ticket.json` (the ticket: step, reason, kept head and neuron indices per layer). Nodes need not share a
file system: at the prune boundary rank 0 broadcasts the initial weights (one flat buffer), and a resumed
search broadcasts the masks read from search.json, so every rank rewinds to the same weights and reaches
the same early-bird decision whatever its own OUT holds (nothing, or a stale file of an earlier run).

Runner integration: the prune hook (`Prune`, one instance per prune stage) watches the stage before its
own: the stage schedule (stages/schedule.py) asks the next stage's hook for `watch(ctx, write_metrics, rank)`
and, given a watcher, calls `start(step, stage_step, engine)` when the stage (re)starts and `observe(step,
engine)` after every optimizer step; either returning True ends the stage now (the schedule records the early
end, and a checkpoint keeps it). Records of kind "earlybird" (mask distances, coefficient
statistics) go to metrics.jsonl.

hook_args of the prune stage:
    {ratio_heads: 0.3333, ratio_ffn: 0.4, rewind: init|keep,
     search: {interval: 10, window: 5, threshold: 0.1}}
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from training.model import params
from training.model.config import ModelConfig
# The slimming tensors and their fold live with the model (export folds them too), the arguments, the ticket, the
# search and the files in earlybird.py; tests and tools reach them through this module too.
from training.model.slimming import HEAD_COEF, NEURON_COEF, fold_slimming  # noqa: F401
from training.stages.earlybird import (EarlyBirdSearch, PruneArgs, SearchArgs, Ticket, _pack,  # noqa: F401
                                       coefficients, draw_ticket, earlybert_dir, is_rank0, load_init_weights,
                                       mask_distance, save_init_weights, slimming_stats, write_json)
from training.stages.protocol import Hook, HookContext, Tensors, Transition

log = logging.getLogger(__name__)

_FREE_FIELDS = (*ModelConfig.REGULARISATION_FIELDS, *ModelConfig.PER_LAYER_FIELDS, "slimming", "slimming_l1")


# ------------------------------------------------------------------------------------------ the weights

def prune_tensors(tensors: Tensors, cfg: ModelConfig, ticket: Ticket) -> Tensors:
    """Keep only the ticket's heads and FFN neurons in every layer, along every axis that runs over them
    (training/model/params.py: the attention width A of Q/K/V and of attention.output.dense's input, the heads N
    of a per-head tensor, the FFN's neurons F of the intermediate rows and the output's input, full or low-rank);
    other tensors pass through."""
    d = cfg.head_dim
    out = {}
    for name, t in tensors.items():
        param = params.describe(name)
        if param.layer is None:
            out[name] = t
            continue
        heads = torch.tensor(ticket.heads[param.layer], dtype=torch.long)
        keep = {"A": (heads[:, None] * d + torch.arange(d)[None, :]).flatten(), "N": heads,
                "F": torch.tensor(ticket.neurons[param.layer], dtype=torch.long)}
        cut = t
        for dim, axis in enumerate(param.axes):
            if axis.upper() in keep:
                cut = cut.index_select(dim, keep[axis.upper()])
        out[name] = cut.clone() if cut is not t else t
    return out


# ------------------------------------------------------------------------------------------- prune hook

def _validate(old: ModelConfig, new: ModelConfig, stage, args: PruneArgs) -> None:
    if not old.slimming:
        raise ValueError("the previous (search) stage needs model.slimming: true")
    if new.slimming:
        raise ValueError("the pruned stage folds the coefficients into the weights: set model.slimming: false")
    if new.heads_per_layer is not None or new.ffn_per_layer is not None:
        raise ValueError("heads_per_layer / ffn_per_layer of the pruned stage are decided from the ticket; "
                         "leave them unset")
    diffs = old.describe_diff(new, ignore=_FREE_FIELDS)
    if diffs:
        raise ValueError(f"pruning keeps the rest of the shape; changed: {diffs}")
    if args.rewind == "init" and stage.optimizer_state != "reset":
        raise ValueError("rewind: init restarts from the initial weights, whose optimizer state is fresh: "
                         "set optimizer_state: reset (or rewind: keep)")


class Prune(Hook):
    """The prune stage's hook. Its instance watches the search stage before it (`watch`: the early-bird
    search), draws the ticket at the boundary (`resolve`) and keeps it, with the coefficients it was drawn
    from, for the transforms of the same boundary: the moments carry no coefficient values."""
    name, Args = "prune", PruneArgs

    def __init__(self, hook_args: Optional[dict] = None):
        super().__init__(hook_args)
        self.ticket: Optional[Ticket] = None
        self.coefs: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None

    def validate(self, t: Transition) -> None:
        _validate(t.old, t.new, t.stage, self.args)

    def watch(self, ctx: HookContext, write: Callable[[dict], None], rank: int) -> EarlyBirdSearch:
        return EarlyBirdSearch(self.args, ctx.out_dir, write, rank)

    def _draw(self, tensors: Tensors) -> None:
        heads, neurons = coefficients(tensors)
        self.ticket = draw_ticket(heads, neurons, self.args.ratio_heads, self.args.ratio_ffn)
        self.coefs = (heads, neurons)

    def resolve(self, old: ModelConfig, declared: ModelConfig, tensors: Tensors, ctx: HookContext) -> ModelConfig:
        self._draw(tensors)
        ticket = self.ticket
        new = declared.model_copy(update={"heads_per_layer": ticket.heads_per_layer,
                                          "ffn_per_layer": ticket.ffn_per_layer})
        if is_rank0():
            write_json(earlybert_dir(ctx.out_dir) / "ticket.json",
                        {"step": ctx.step, "reason": "prune", "rewind": self.args.rewind, **ticket.to_json()})
        log.info("EarlyBERT: pruning to heads %s, FFN %s (rewind: %s)", ticket.heads_per_layer,
                 ticket.ffn_per_layer, self.args.rewind)
        return new

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        """Fold, then cut (moment 0: the weights; 1, 2: optimizer moments, see fold_slimming). With rewind:
        init the weights are first replaced by the search stage's initial ones: a collective, every rank
        calls."""
        if self.ticket is None:  # called without resolve (tests): the tensors must be weights with coefficients
            self._draw(tensors)
        coefs = self.coefs
        if self.args.rewind == "init":
            if moment != 0:
                raise ValueError("rewind: init restarts from the initial weights: their optimizer state is fresh, "
                                 "no moments carry over (optimizer_state: reset)")
            tensors, coefs = load_init_weights(ctx.out_dir, tensors), None  # the initial coefficients (1) are folded
        return prune_tensors(fold_slimming(tensors, old, coefs, moment), old, self.ticket)
