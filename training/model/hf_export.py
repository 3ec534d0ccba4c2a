"""Hugging Face export: our model to `transformers.BertForMaskedLM` (Post-LN, MLM only), `BertForPreTraining`
(Post-LN with the NSP head, `model.nsp`) or `transformers.RobertaPreLayerNormForMaskedLM` (Pre-LN, `model.norm:
pre`), with the tokenizer files. config.json's `architectures` names the head the export really has, and the
tokenizer's `model_max_length` is the model's `max_position`, so `truncation=True` and `pipeline("fill-mask")` cut
long inputs to what the model takes.

transformers is imported lazily, in export only. A pooler the model carries (`model.carry_pooler`, imported by
training/model/hf.py, which reads HF configs and checkpoints) is written back as imported.

Pre-LN export. transformers' RoBERTa-PreLayerNorm is the same network as our `norm: pre` model: embeddings
(word + position + token type, then LayerNorm, dropout), layers x + attn(LN(x)) and x + ffn(LN(x)), a final
LayerNorm, and the MLM head dense -> erf GeLU -> LayerNorm -> decoder tied to the word embeddings, all with
one layer_norm_eps. The tensors only move (`_pre_ln_name`): per layer, `attention.output.LayerNorm` (ours,
before attention) -> `attention.LayerNorm`, `output.LayerNorm` (ours, before the FFN) -> `intermediate.LayerNorm`;
`bert.encoder.final_layer_norm` -> `roberta_prelayernorm.LayerNorm`; `cls.predictions.transform.{dense,
LayerNorm}` -> `lm_head.{dense,layer_norm}`, `cls.predictions.bias` -> `lm_head.bias`; every other `bert.` name
-> `roberta_prelayernorm.`. Positions: RoBERTa numbers the tokens of a row from input_ids, as padding_idx +
(count of non-pad tokens up to and including this one), so padding_idx + 1 first, and gives pad tokens padding_idx.
So our position row p is written at their row p + pad_token_id + 1 (rows 0..pad_token_id are zeros and
never read by a real token), and max_position_embeddings = max_position + pad_token_id + 1. That equals our
`arange` positions exactly for every real token when padding is at the end of the row (our collator pads at
the end) and no real token has the pad id; pad positions themselves get another position row, but they are
masked keys, so no real token's output changes. Left-padded or interleaved pad tokens would shift the real
tokens' positions: pass `position_ids` explicitly (ours + pad_token_id + 1) for such inputs. RoBERTa's MLM
class has no pooler and no NSP head: an `nsp` model's pooler and `cls.seq_relationship` are left out of the
export (logged). The tokenizer is still our WordPiece (vocab.txt), not RoBERTa's BPE: the export's
tokenizer_config.json names `BertTokenizer`, so `AutoTokenizer.from_pretrained(out_dir)` loads it
(equivalently `BertTokenizerFast.from_pretrained(out_dir)`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from training.errors import UserError
from training.model import params
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.hf import POOLER_KEYS, PathLike

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Pre-LN export: our name -> RobertaPreLayerNormForMaskedLM's (see the docstring), by what each tensor is
# (training/model/params.py): a layer's two LayerNorms move, the rest of `bert.` becomes `roberta_prelayernorm.`.
_PRE_LN_LAYER_ROLES = {"attention.output.LayerNorm.": "attention.LayerNorm.", "output.LayerNorm.": "intermediate.LayerNorm."}
_PRE_LN_PARTS = {"final_norm": ("bert.encoder.final_layer_norm.", "roberta_prelayernorm.LayerNorm."),
                 "mlm_bias": ("cls.predictions.bias", "lm_head.bias")}
_PRE_LN_DROPPED = ("pooler", "nsp")  # no NSP head in RobertaPreLayerNormForMaskedLM
PRE_LN_POSITIONS = "roberta_prelayernorm.embeddings.position_embeddings.weight"


def check_exportable(cfg: ModelConfig) -> None:
    target = "RobertaPreLayerNorm" if cfg.norm == "pre" else "BERT"  # the HF architecture export_hf writes
    if cfg.attention == "linear":
        raise UserError(f"cannot export to HF: HF {target} has softmax attention only, not linear attention")
    if cfg.ffn_rank is not None:
        raise UserError(f"cannot export to HF: HF {target} has no low-rank FFN (model.ffn_rank); "
                        "multiply the factors out into a full-rank model first")
    if cfg.heads_per_layer is not None and any(h != cfg.num_heads for h in cfg.heads_per_layer):
        pruned = ", ".join(f"layer {i}: {h}" for i, h in enumerate(cfg.heads_per_layer) if h != cfg.num_heads)
        raise UserError(f"cannot export to HF: pruned heads ({pruned} of {cfg.num_heads} heads; "
                        f"model.heads_per_layer={cfg.heads_per_layer}) are not representable: transformers 5 "
                        f"{target}Config has no pruned_heads and fixes head_dim = hidden/heads, so a layer with "
                        f"fewer heads of head_dim {cfg.head_dim} cannot be written, even when every layer "
                        "has the same count")
    if cfg.ffn_per_layer is not None and len(set(cfg.ffn_per_layer)) > 1:
        raise UserError(f"cannot export to HF: HF {target} has one intermediate_size for all layers; "
                        f"model.ffn_per_layer is non-uniform {cfg.ffn_per_layer}")


def _pre_ln_name(param: params.Param):
    """RobertaPreLayerNormForMaskedLM's name for our tensor (None: it has no place there, the pooler and NSP head)."""
    if param.part in _PRE_LN_DROPPED:
        return None
    if param.layer is not None:
        role = next((param.role.replace(ours, theirs, 1) for ours, theirs in _PRE_LN_LAYER_ROLES.items()
                     if param.role.startswith(ours)), param.role)
        return f"roberta_prelayernorm.encoder.layer.{param.layer}.{role}"
    if param.part in _PRE_LN_PARTS:
        ours, theirs = _PRE_LN_PARTS[param.part]
        return param.name.replace(ours, theirs, 1)
    if param.part == "mlm_transform":
        return param.name.replace("cls.predictions.transform.", "lm_head.", 1).replace("lm_head.LayerNorm.",
                                                                                    "lm_head.layer_norm.")
    if param.part == "embeddings":
        return param.name.replace("bert.", "roberta_prelayernorm.", 1)
    raise UserError(f"cannot export to HF: tensor {param.name} has no place in RobertaPreLayerNormForMaskedLM")


def _pre_ln_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our Pre-LN tensors under RobertaPreLayerNormForMaskedLM's names; our position row p at their row
    p + pad_token_id + 1 (RoBERTa's first real position id is pad_token_id + 1), rows before it zero; pooler and
    NSP head left out (no place there)."""
    out, dropped = {}, []
    for name, tensor in tensors.items():
        hf_name = _pre_ln_name(params.describe(name))
        if hf_name is None:
            dropped.append(name)
        else:
            out[hf_name] = tensor
    if dropped:
        log.warning("HF RobertaPreLayerNormForMaskedLM has no pooler or NSP head: the export leaves out %s",
                    ", ".join(dropped))
    positions = out[PRE_LN_POSITIONS]
    offset = cfg.pad_token_id + 1
    shifted = torch.zeros(positions.shape[0] + offset, positions.shape[1], dtype=positions.dtype)
    shifted[offset:] = positions
    out[PRE_LN_POSITIONS] = shifted
    return out


def _token_id(tokenizer_dir: Path, token: str) -> int | None:
    """The id of `token` in the tokenizer files of `tokenizer_dir` (tokenizer.json or vocab.txt), None if absent."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(token)
    if (tokenizer_dir / "vocab.txt").is_file():
        vocab = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return vocab.index(token) if token in vocab else None
    return None


def tokenizer_size(tokenizer_dir: Path) -> int | None:
    """Tokens of the tokenizer in `tokenizer_dir` (tokenizer.json, else vocab.txt), None without either."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
        except Exception as err:  # tokenizers raises plain Exceptions for a broken file
            raise UserError(f"{tokenizer_dir / 'tokenizer.json'}: cannot be read ({err})") from None
    if (tokenizer_dir / "vocab.txt").is_file():
        try:
            with open(tokenizer_dir / "vocab.txt", encoding="utf-8") as f:
                return sum(1 for _ in f)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{tokenizer_dir / 'vocab.txt'}: cannot be read ({err})") from None
    return None


def _check_tokenizer_fits(tokenizer_dir: Path, cfg: ModelConfig) -> None:
    """A tokenizer of another vocabulary size than the model's embedding table would give ids the model has
    no row for (or rows no token reaches): the export would load and then fail, or score garbage."""
    size = tokenizer_size(tokenizer_dir)
    if size is not None and size != cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer_dir} has {size} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}: it belongs to another model; give the model's own tokenizer")


def _set_tokenizer_config(out: Path, cfg: ModelConfig) -> None:
    """The exported tokenizer_config.json: `model_max_length` = the model's max_position (without it transformers
    assumes no limit, so truncation=True cuts nothing and a long input overruns the position table), and, for a
    Pre-LN export, `tokenizer_class` BertTokenizer: a roberta-prelayernorm config.json would otherwise make
    AutoTokenizer look for RoBERTa's BPE files. A bare vocab.txt gets the casing our own loader assumes for it
    (training.data.tokenizer: a sibling tokenizer_config.json's do_lower_case, else lowercase)."""
    path = out / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.is_file() else {"do_lower_case": True}
    conf["model_max_length"] = cfg.max_position
    if cfg.norm == "pre" and not str(conf.get("tokenizer_class", "")).startswith("Bert"):
        conf["tokenizer_class"] = "BertTokenizer"
    path.write_text(json.dumps(conf, indent=2) + "\n")


def export_hf(model: BertForPreTraining, cfg: ModelConfig, out_dir: PathLike,
              tokenizer_dir: PathLike | None = None) -> Path:
    """Write `out_dir` loadable by `transformers.AutoModelForMaskedLM.from_pretrained(out_dir)`: a Post-LN model
    as `BertForMaskedLM` (with NSP, `cfg.nsp`: `BertForPreTraining`), a Pre-LN one (`model.norm: pre`) as
    `RobertaPreLayerNormForMaskedLM`. `cfg.norm` picks the architecture; what neither can represent raises
    UserError.

    Weights are written as float32 safetensors. The tied decoder tensors are left out (HF re-ties
    them). Post-LN: only the heads the model has are written (an MLM-only model has no NSP head, and its
    config.json says BertForMaskedLM); a pooler it carries (cfg.carry_pooler: imported with model.init_from_hf)
    is written as imported, for AutoModel and the sequence-classification heads. Pre-LN: the
    tensors are renamed and the position table offset as the module docstring describes; an NSP model's pooler
    and NSP classifier are left out (logged), since RoBERTa's MLM class has neither. Feed the Pre-LN export
    end-padded batches (as our collator makes) or explicit position_ids. The tokenizer files are copied, with
    model_max_length = cfg.max_position; for Pre-LN, tokenizer_config.json names BertTokenizer (our WordPiece
    vocab.txt, not RoBERTa's BPE), so AutoTokenizer / BertTokenizerFast load it.
    """
    from safetensors.torch import save_file

    check_exportable(cfg)
    if tokenizer_dir is not None:
        _check_tokenizer_fits(Path(tokenizer_dir), cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors = {name: p.detach().to("cpu", torch.float32).contiguous()
               for name, p in model.named_parameters()}  # de-duplicated: no decoder aliases
    for addon in model.addons:  # e.g. EarlyBERT's coefficients, folded into the next Linear: same function
        tensors = addon.fold(tensors, cfg)
    if cfg.norm == "pre":
        tensors = _pre_ln_tensors(tensors, cfg)
        hf_cfg = _pre_ln_config(cfg, Path(tokenizer_dir) if tokenizer_dir is not None else None)
    else:
        tensors.update({name: b.detach().to("cpu", torch.float32).contiguous()  # carried: as imported
                        for name, b in model.named_buffers() if name in POOLER_KEYS})
        hf_cfg = _post_ln_config(cfg)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg.save_pretrained(str(out))

    if tokenizer_dir is not None:
        copied = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
        if not copied:
            raise UserError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        for name in copied:
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
        _set_tokenizer_config(out, cfg)
    return out


def _shape_kwargs(cfg: ModelConfig) -> dict:
    """The config fields BERT and RoBERTa-PreLN share, from ours (positions: see _pre_ln_config)."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.layer_ffn(0),  # uniform (checked above)
                hidden_act="gelu", hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
                type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range,
                layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, tie_word_embeddings=True)


def _post_ln_config(cfg: ModelConfig):
    from transformers import BertConfig

    return BertConfig(**_shape_kwargs(cfg), max_position_embeddings=cfg.max_position,
                      architectures=["BertForPreTraining" if cfg.nsp else "BertForMaskedLM"])


def _pre_ln_config(cfg: ModelConfig, tokenizer_dir: Path | None):
    from transformers import RobertaPreLayerNormConfig

    special = {}
    if tokenizer_dir is not None:  # RoBERTa's bos / eos are BERT's [CLS] / [SEP]
        special = {"bos_token_id": _token_id(tokenizer_dir, "[CLS]"), "eos_token_id": _token_id(tokenizer_dir, "[SEP]")}
        pad = _token_id(tokenizer_dir, "[PAD]")
        if pad is not None and pad != cfg.pad_token_id:
            log.warning("tokenizer %s has [PAD] = %d but model.pad_token_id = %d: RoBERTa derives positions from "
                        "pad_token_id, so inputs padded with [PAD] number their pads as real tokens",
                        tokenizer_dir, pad, cfg.pad_token_id)
    return RobertaPreLayerNormConfig(
        **_shape_kwargs(cfg),
        max_position_embeddings=cfg.max_position + cfg.pad_token_id + 1,  # real positions start at pad + 1
        bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"),
        architectures=["RobertaPreLayerNormForMaskedLM"],
    )
