"""Data pipeline: raw text -> WordPiece tokenizer -> packed [CLS] A [SEP] B [SEP] rows (Arrow),
plus dynamic-masking collation and deterministic, rank-sliced batch iteration.

CLI: `python -m training.data prepare ...` / `python -m training.data build-default ...`.
"""
from training.data.collator import MLMCollator
from training.data.loader import PretrainingData

__all__ = ["MLMCollator", "PretrainingData"]
