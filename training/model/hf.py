"""Hugging Face import: a BERT config.json -> ModelConfig (`model_config_from_hf`), and a BERT checkpoint
(BertModel, BertForMaskedLM, BertForPreTraining) or our Pre-LN export (RobertaPreLayerNormForMaskedLM) -> our
model's weights (`load_hf_weights`). The export is training/model/hf_export.py (`export_hf`).

Only local directories are read (no hub access). transformers is not imported here.

Every tensor of an imported checkpoint that the model has survives import -> train -> export under its HF
name: trained ones as trained, and the pooler (`bert.pooler.dense`) of an MLM-only model (nsp false) as
imported. MLM never uses that pooler, so `model.init_from_hf` sets `model.carry_pooler` when the checkpoint
has one: the model then holds it as fp32 buffers (encoder.CarriedPooler), which no optimizer, gradient or bf16
cast touches, which checkpoints and stage transitions carry, and which `export_hf` writes back instead of a
freshly drawn pooler. With nsp true the pooler is a trained parameter like any other. Checkpoint tensors
the model has no place for (an NSP classifier `cls.seq_relationship` when nsp is false) are dropped at
import; the export then draws that classifier fresh (seeded), as HF's pre-training class needs one.

A Pre-LN checkpoint is read back with the inverse of the export's renames (`_PRE_LN_IMPORTS`), its position
table shifted back by pad_token_id + 1 rows (hf_export.py's module doc says why).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Union

import torch
from pydantic import ValidationError

from training.errors import UserError
from training.model import params
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
# In HF the decoder shares these tensors; checkpoints may hold either name (or both).
TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Present in some checkpoints, never parameters of ours: skipped silently.
IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
POOLER_KEYS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")

PRE_LN_TYPE = "roberta-prelayernorm"  # transformers' model_type of RobertaPreLayerNormForMaskedLM


def model_config_from_hf(hf_dir: PathLike, flag: str = "model.init_from_hf", **overrides) -> ModelConfig:
    """ModelConfig from an HF BERT config.json. `overrides` set our own fields (attention, nsp, ...);
    they default to ModelConfig's defaults (e.g. nsp=False even for a BertForPreTraining checkpoint).
    config.json is read by training/model/hf_dir.py (`flag` names the dir in a message), as every reader of an
    HF dir reads it; the weights are checked when load_hf_weights reads them (hf_dir.read_weights)."""
    from training.model.hf_dir import read_config

    hf = read_config(Path(hf_dir), flag)
    path = Path(hf_dir) / "config.json"
    model_type = hf.get("model_type", "bert")
    if model_type not in ("bert", PRE_LN_TYPE):
        raise UserError(f"{path}: model_type {model_type!r} is neither 'bert' nor {PRE_LN_TYPE!r}")
    pre = model_type == PRE_LN_TYPE
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{path}: hidden_act {act!r} is not supported (only exact 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in hf]
    if missing:
        raise UserError(f"{path}: {missing[0]} is missing; not a BERT config")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        ffn_size=hf["intermediate_size"],
        # RoBERTa numbers real positions from pad_token_id + 1 (see hf_export._pre_ln_tensors): the rows before
        # are not ours.
        max_position=_int(hf.get("max_position_embeddings", 512), path) - (
            _int(hf.get("pad_token_id") or 0, path) + 1 if pre else 0),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id") or 0,
        norm="pre" if pre else "post",
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]  # one line: the first field pydantic refused
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: invalid model config: {where + ': ' if where else ''}"
                        f"{first['msg'].removeprefix('Value error, ')}") from None


def _int(value, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{path}: {value!r} where an integer belongs (max_position_embeddings, pad_token_id)")
    return value


def checkpoint_has_pooler(hf_dir: PathLike) -> bool:
    """Whether the HF checkpoint in `hf_dir` holds a pooler (bert.pooler.dense, any HF key spelling)."""
    from training.model.hf_dir import tensor_names

    names = _normalise_keys(dict.fromkeys(tensor_names(Path(hf_dir))))
    return all(k in names for k in POOLER_KEYS)


def _normalise_keys(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF BertModel / BertForMaskedLM / BertForPreTraining keys onto our (= HF pre-training) names."""
    out = {}
    for key, tensor in raw.items():
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key  # bare BertModel checkpoints have no "bert." prefix
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = tensor
    for alias, target in TIED_ALIASES.items():
        if alias in out:
            tensor = out.pop(alias)
            out.setdefault(target, tensor)
    return out


_PRE_LN_PREFIX = "roberta_prelayernorm."
# The inverse of hf_export._pre_ln_name: RobertaPreLayerNormForMaskedLM's names -> ours, first matching pattern wins.
_PRE_LN_IMPORTS = (
    (r"^roberta_prelayernorm\.encoder\.layer\.(\d+)\.attention\.LayerNorm\.",
     r"bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^roberta_prelayernorm\.encoder\.layer\.(\d+)\.intermediate\.LayerNorm\.",
     r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"^roberta_prelayernorm\.LayerNorm\.", "bert.encoder.final_layer_norm."),
    (r"^roberta_prelayernorm\.(embeddings|encoder)\.", r"bert.\1."),
    (r"^lm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"^lm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"^lm_head\.bias$", "cls.predictions.bias"),
)
_PRE_LN_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")  # the word embeddings and lm_head.bias again


def _from_pre_ln(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A RobertaPreLayerNorm(ForMaskedLM) checkpoint under our names (what export_hf wrote, read back): position
    row pad_token_id + 1 + p becomes our row p; names with no counterpart pass through for the caller's checks."""
    out = {}
    for name, tensor in raw.items():
        if name in _PRE_LN_TIED:
            continue
        for pattern, replacement in _PRE_LN_IMPORTS:
            ours, hits = re.subn(pattern, replacement, name)
            if hits:
                break
        else:
            ours = name  # e.g. a classification head: reported as unexpected, as for a BERT checkpoint
        out[ours] = tensor
    positions = "bert.embeddings.position_embeddings.weight"
    if positions in out:
        out[positions] = out[positions][cfg.pad_token_id + 1:]
    return out


def _low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation W ~ V U (truncated SVD, singular values split evenly), so a
    full-rank checkpoint can initialise a CoRe low-rank FFN. Returns (U [r, in], V [out, r])."""
    left, sing, right_t = torch.linalg.svd(weight.float(), full_matrices=False)
    root = sing[:rank].sqrt()
    return root[:, None] * right_t[:rank], left[:, :rank] * root[None, :]


def _factorise_ffn(state: dict[str, torch.Tensor], model: BertForPreTraining) -> None:
    """Replace full-rank FFN tensors by dense_u / dense_v when the model has cfg.ffn_rank."""
    rank = model.cfg.ffn_rank
    for i in range(model.cfg.num_layers):
        for part in ("intermediate", "output"):
            prefix = f"bert.encoder.layer.{i}.{part}."
            if prefix + "dense.weight" not in state:
                continue
            u, v = _low_rank_factors(state.pop(prefix + "dense.weight"), rank)
            state[prefix + "dense_u.weight"], state[prefix + "dense_v.weight"] = u, v
            state[prefix + "dense_v.bias"] = state.pop(prefix + "dense.bias")
    log.info("factorised the checkpoint's FFN weights to rank %d by truncated SVD", rank)


def load_hf_weights(model: BertForPreTraining, hf_dir: PathLike) -> list[str]:
    """Load an HF BERT checkpoint (BertModel, BertForMaskedLM or BertForPreTraining) into `model`.

    Returns the names of our parameters the checkpoint lacked; these keep their init. Only head
    tensors (cls.*, bert.pooler.*) may be missing: a missing embedding/encoder tensor, an extra
    encoder layer or a shape mismatch raises UserError. A model with cfg.carry_pooler gets the
    checkpoint's pooler into its carried (untrained) buffers, and needs it there. Checkpoint heads our
    model has no place for (pooler without carry_pooler, NSP classifier when cfg.nsp is false) are
    ignored. Full-rank FFN weights are SVD-factorised into a low-rank model (cfg.ffn_rank).
    """
    from training.model.hf_dir import read_weights

    hf_dir = Path(hf_dir)
    raw = read_weights(hf_dir)
    pre = any(k.startswith(_PRE_LN_PREFIX) for k in raw)
    if pre != (model.cfg.norm == "pre"):
        kind = "a Pre-LN RobertaPreLayerNorm" if pre else "a Post-LN BERT"
        raise UserError(f"{hf_dir}: {kind} checkpoint cannot load into a model.norm: {model.cfg.norm} model")
    state = _from_pre_ln(raw, model.cfg) if pre else _normalise_keys(raw)
    if model.cfg.ffn_rank is not None:
        _factorise_ffn(state, model)

    ours = dict(model.named_parameters())  # de-duplicated: tied decoder names are not listed
    carried = {name: b for name, b in model.named_buffers() if name in POOLER_KEYS}  # cfg.carry_pooler
    lacking = [k for k in carried if k not in state]
    if lacking:
        raise UserError(f"{hf_dir}: checkpoint lacks {lacking[0]}, which model.carry_pooler carries; "
                        "set model.carry_pooler: false")
    unexpected = [k for k in state if k not in ours and k not in carried and k not in IGNORED_KEYS]
    body_extra = [k for k in unexpected if k.startswith(("bert.embeddings.", "bert.encoder."))]
    if body_extra:
        raise UserError(f"{hf_dir}: checkpoint tensor {body_extra[0]} has no counterpart in the model "
                        f"(layer count or architecture mismatch; {len(body_extra)} such tensors)")
    if unexpected:
        log.info("ignoring checkpoint tensors the model does not use: %s", ", ".join(unexpected))

    missing = [k for k in ours if k not in state]
    # A model add-on's tensors (EarlyBERT's slimming coefficients) are ours only: they keep their init.
    body_missing = [k for k in missing if not k.startswith(("cls.", "bert.pooler."))
                    and params.describe(k).addon is None]
    if body_missing:
        raise UserError(f"{hf_dir}: checkpoint lacks {body_missing[0]} ({len(body_missing)} "
                        f"embedding/encoder tensors missing)")
    for name, param in {**ours, **carried}.items():
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            raise UserError(f"{hf_dir}: tensor {name} has shape {tuple(state[name].shape)} in the "
                            f"checkpoint but {tuple(param.shape)} in the model")
    with torch.no_grad():
        for name, param in {**ours, **carried}.items():
            if name in state:
                param.copy_(state[name])
    if missing:
        log.info("kept initial values for tensors absent from %s: %s", hf_dir, ", ".join(missing))
    return missing
