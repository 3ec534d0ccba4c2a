"""BERT WordPiece tokenizer: train on the corpus, or load vocab.txt / tokenizer.json; save for HF."""
from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from training.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first so its id is 0
MIN_TRAIN_VOCAB = 64
MAX_TRAIN_VOCAB = 1 << 20  # more WordPiece tokens than any BERT has; a typo, and a huge embedding table


def parse_spec(spec: str) -> int | None:
    """Vocab size for 'train:N', None for a path."""
    if not spec.startswith("train:"):
        return None
    try:
        size = int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--tokenizer {spec}: expected train:VOCAB_SIZE with an integer size")
    if not MIN_TRAIN_VOCAB <= size <= MAX_TRAIN_VOCAB:
        raise UserError(f"--tokenizer {spec}: vocab size must be in [{MIN_TRAIN_VOCAB}, {MAX_TRAIN_VOCAB}]")
    return size


def _bert_pipeline(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _finish(tok: Tokenizer, where: str) -> Tokenizer:
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise UserError(f"--tokenizer {where}: vocabulary lacks special tokens {' '.join(missing)}")
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    # A loaded tokenizer.json may carry truncation/padding (MiniLM's truncates at 128): we tokenise
    # whole documents, so both must be off.
    tok.no_truncation()
    tok.no_padding()
    return tok


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)),
                         lowercase=True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##", show_progress=True)
    tok.train_from_iterator(texts, trainer)
    return _finish(tok, f"train:{vocab_size}")


def load(path: str) -> Tokenizer:
    """Load a tokenizer.json or vocab.txt, or a directory holding either (tokenizer.json preferred)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return load(os.path.join(path, name))
        raise UserError(f"--tokenizer {path}: directory has neither tokenizer.json nor vocab.txt")
    if not os.path.isfile(path):
        raise UserError(f"--tokenizer {path}: no such file (want PATH or train:VOCAB_SIZE)")
    try:
        if path.endswith(".json"):
            tok = Tokenizer.from_file(path)
        else:
            tok = Tokenizer(models.WordPiece.from_file(path, unk_token="[UNK]"))
            tok = _bert_pipeline(tok, lowercase=_lowercase_hint(os.path.dirname(path)))
    except Exception as err:  # tokenizers raises plain Exception subclasses for bad files
        raise UserError(f"--tokenizer {path}: cannot read tokenizer ({str(err).splitlines()[0]})")
    if tok.get_vocab_size() == 0:
        raise UserError(f"--tokenizer {path}: empty vocabulary")
    return _finish(tok, path)


def _lowercase_hint(directory: str) -> bool:
    """A bare vocab.txt says nothing about casing: honour a sibling tokenizer_config.json, else lowercase."""
    try:
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("do_lower_case", True))
    except (OSError, ValueError):
        return True


def save(tok: Tokenizer, out_dir: str) -> None:
    """Write a directory that `AutoTokenizer.from_pretrained` loads offline (plus vocab.txt)."""
    from transformers import BertTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    lowercase = bool(getattr(tok.normalizer, "lowercase", True))
    hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=10**6)
    hf.save_pretrained(out_dir)
    # transformers 5 writes only tokenizer.json + tokenizer_config.json; older tools want these too.
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token, _ in vocab)
    special = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
