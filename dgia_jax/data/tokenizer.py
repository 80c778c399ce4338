"""One tokenizer interface over Hugging Face `tokenizers`, with CLIP's fixed-length layout.

A caption becomes `[SOT] + pieces[: L - 2] + [EOT] + [PAD] * rest`: the end-of-text token is
always kept when a caption is truncated, because the text tower reads its feature there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
MASK = "<|mask|>"
PAD = "<|pad|>"
UNK = "<|unk|>"


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A lower-casing BPE trained on `texts`, with the special tokens this project uses."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, SOT, EOT, MASK, UNK],
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


class Tokenizer:
  """Fixed-length CLIP-style encoding.

  Attributes:
    context_length: L, tokens per caption.
    sot_id, eot_id, pad_id, mask_id: special token ids. `mask_id` replaces content tokens in
      the information-asymmetric text partner.
    vocab_size: rows the token embedding needs.
  """

  def __init__(self, tok: tokenizers.Tokenizer, context_length: int):
    if context_length < 3:
      raise ValueError(f"context_length must be at least 3 (SOT, one token, EOT), got {context_length}")
    self._tok = tok
    self.context_length = context_length
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in (SOT, EOT, MASK) if t not in vocab]
    if missing:
      raise ValueError(f"tokenizer lacks the special tokens {missing}")
    self.sot_id = vocab[SOT]
    self.eot_id = vocab[EOT]
    self.mask_id = vocab[MASK]
    self.pad_id = vocab.get(PAD, 0)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_file(cls, path: str, context_length: int) -> "Tokenizer":
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return cls(tokenizers.Tokenizer.from_file(path), context_length)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Encodes captions to int32 [N, context_length]."""
    for i, text in enumerate(texts):
      if not text or not text.strip():
        raise ValueError(f"caption {i} is empty")
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    keep = self.context_length - 2
    for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
      ids = enc.ids[:keep]
      out[i, 0] = self.sot_id
      out[i, 1:len(ids) + 1] = ids
      out[i, len(ids) + 1] = self.eot_id
    return out

  def decode(self, tokens: np.ndarray) -> str:
    """Text of one encoded caption [L] (special tokens dropped, mask shown as MASK)."""
    specials = {self.sot_id, self.eot_id, self.pad_id}
    return self._tok.decode([int(t) for t in tokens if int(t) not in specials], skip_special_tokens=False)
