"""One tokenizer interface over Hugging Face `tokenizers`, with CLIP's fixed-length layout.

A caption becomes `[SOT] + pieces[: L - 2] + [EOT] + [PAD] * rest`: the end-of-text token is
always kept when a caption is truncated, because the text tower reads its feature there.
This is OpenAI's `clip.tokenize(truncate=True)` layout, padding included (id 0 when the
vocabulary has no `<|pad|>`); Hugging Face pads with EOT instead, which gives the same
features since the causal text tower reads the first EOT.

A tokenizer comes from our own `tokenizer.json` or from a CLIP checkpoint folder
(`tokenizer.json`, or `vocab.json` + `merges.txt`, as `openai/clip-vit-base-patch16` ships
them). CLIP's vocabulary (49,408 tokens) has no mask token: `<|mask|>` is then appended as
a special token with the next free id (49,408), so every CLIP id keeps its meaning and the
model's token embedding grows by one row (`num_appended`), which the checkpoint loader adds
(`dgia_jax.models.checkpoint_io`). Reusing an existing token instead would make masked and
real occurrences of it indistinguishable to the text tower.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from absl import logging
from tokenizers import AddedToken, models, normalizers, pre_tokenizers, trainers

from dgia_jax.common import errors
from dgia_jax.data import field_text

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


def _read_tokenizer_json(path: str) -> tokenizers.Tokenizer:
  """A Hugging Face `tokenizer.json`; any other file is a BadInputError naming it."""
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception)
    raise errors.BadInputError(f"{path} is not a Hugging Face tokenizer file (tokenizer.json): {e}") from e


class Tokenizer:
  """Fixed-length CLIP-style encoding.

  Attributes:
    context_length: L, tokens per caption.
    sot_id, eot_id, pad_id, mask_id: special token ids. `mask_id` replaces content tokens in
      the information-asymmetric text partner.
    vocab_size: rows the token embedding needs.
    num_appended: tokens appended to the source vocabulary (the mask token, if it lacked
      one); their ids are the last ones.
  """

  def __init__(self, tok: tokenizers.Tokenizer, context_length: int, clean=None):
    if context_length < 3:
      raise errors.ConfigError(f"data.context_length must be at least 3 (SOT, one token, EOT), got {context_length}")
    tok.no_padding()  # the fixed-length layout is ours; a saved tokenizer may carry its own
    tok.no_truncation()
    self._tok, self._clean = tok, clean
    self.context_length = context_length
    missing = [t for t in (SOT, EOT) if tok.token_to_id(t) is None]
    if missing:
      raise errors.BadInputError(f"tokenizer lacks the special tokens {missing}")
    self.num_appended = 0
    if tok.token_to_id(MASK) is None:
      self.num_appended = tok.add_special_tokens([AddedToken(MASK, special=True)])
    vocab = tok.get_vocab(with_added_tokens=True)
    self.sot_id = vocab[SOT]
    self.eot_id = vocab[EOT]
    self.mask_id = vocab[MASK]
    self.pad_id = vocab.get(PAD, 0)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_file(cls, path: str, context_length: int, pipeline: str = "hf") -> "Tokenizer":
    """A `tokenizer.json` file, or a CLIP folder (`tokenizer.json`, or `vocab.json` + `merges.txt`).

    `pipeline` "irra": the field's text pipeline on CLIP's BPE at `path` (`field_text`: ftfy and
    HTML cleaning, the mask token at id 49405 with its pretrained row, nothing appended), what a
    released checkpoint of the field was trained on; "hf": the tokenizer's own."""
    if not os.path.exists(path):
      raise errors.MissingPathError(f"tokenizer file not found: {path}")
    if pipeline == "irra":
      return cls(field_text.field_tokenizer(path), context_length, clean=field_text.clean)
    if not os.path.isdir(path):
      return cls(_read_tokenizer_json(path), context_length)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return cls(_read_tokenizer_json(os.path.join(path, "tokenizer.json")), context_length)
    if all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
      import transformers  # late import: only this layout needs it

      return cls(transformers.CLIPTokenizer.from_pretrained(path).backend_tokenizer, context_length)
    raise errors.MissingPathError(f"{path} holds no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")

  def encode(self, texts: Sequence[str], source: str = "texts") -> np.ndarray:
    """Encodes captions to int32 [N, context_length] (`encode_counted`, the cut ones reported)."""
    return self.encode_counted(texts, source)[0]

  def encode_counted(self, texts: Sequence[str], source: str = "texts", warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [N, context_length], int64 [N] word pieces of each text before any cut).

    A caption of more than L - 2 pieces is cut to its first L - 2 (CLIP's `truncate=True`); with
    `warn`, when any is, a warning says how many of `source` (e.g. a split) were, and the longest.
    BadInputError names an empty text.
    """
    for i, text in enumerate(texts):
      if not text or not text.strip():
        raise errors.BadInputError(f"{source}: caption {i} is empty")
    if self._clean is not None:
      texts = [self._clean(t) for t in texts]
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    keep = self.context_length - 2
    pieces = np.zeros(len(texts), np.int64)
    for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
      pieces[i] = len(enc.ids)
      ids = enc.ids[:keep]
      out[i, 0] = self.sot_id
      out[i, 1:len(ids) + 1] = ids
      out[i, len(ids) + 1] = self.eot_id
    cut = int((pieces > keep).sum())
    if warn and cut:
      longest = int(np.argmax(pieces))
      logging.warning("%s: %d of %d captions are longer than %d tokens (context_length %d less SOT and EOT) and "
                      "were truncated to %d; the longest: caption %d, %d tokens: %r", source, cut, len(texts), keep,
                      self.context_length, keep, longest, pieces[longest], texts[longest])
    return out, pieces

  def save(self, path: str) -> None:
    """The BPE and its special tokens as a `tokenizer.json` (the cleaning of a text pipeline is not in it)."""
    self._tok.save(path)

  def decode(self, tokens: np.ndarray) -> str:
    """Text of one encoded caption [L]: the tokens between SOT and the first EOT, mask shown as MASK."""
    ids = [int(t) for t in tokens]
    end = ids.index(self.eot_id) if self.eot_id in ids else len(ids)
    text = self._tok.decode(ids[1:end], skip_special_tokens=False)
    suffix = getattr(self._tok.model, "end_of_word_suffix", None)  # CLIP's BPE marks word ends with </w>
    if not suffix:
      return text
    return " ".join(text.replace(suffix, " ").replace(MASK, f" {MASK} ").split())
