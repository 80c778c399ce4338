"""The field's text pipeline (IRRA's and DGCMIA's tokenizer), as a `tokenizers` BPE: a released
checkpoint sees exactly the token ids it was trained on.

  - cleaning: ftfy's `fix_text`, HTML unescaped twice, stripped, whitespace runs collapsed to one
    space, lower-cased (in that order);
  - OpenAI CLIP's byte-level BPE (words split by CLIP's pattern, `</w>` ending each word) with its
    last merge (`jekyll</w>`) dropped: its id, 49405, is the mask token `<|mask|>`, which keeps that
    row's trained embedding; start 49406, end 49407; 49,408 ids in all.

The authors' code drops that merge's vocabulary entry but keeps the merge, so a caption with the
word "jekyll" raises KeyError there; here the merge is dropped too, and the word is two pieces.

The BPE comes from a CLIP tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`) or
from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (which the field's code ships in its `data/`).
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re

import tokenizers
from tokenizers import AddedToken, Regex, models, pre_tokenizers

from dgia_jax.common import errors

SOT, EOT, MASK = "<|startoftext|>", "<|endoftext|>", "<|mask|>"
VOCAB_SIZE = 49_408
MASK_ID, SOT_ID, EOT_ID = 49_405, 49_406, 49_407
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49_152 - 256 - 2  # the merges OpenAI's vocabulary is made of: lines 1 .. 48,894 of its BPE file
# OpenAI CLIP's words, with the mask token the field's code adds (the text is lower-cased first).
_WORDS = (r"<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
          r"[^\s\p{L}\p{N}]+")


def clean(text: str) -> str:
  """A caption as the field's code cleans it: ftfy, HTML unescaped twice, whitespace collapsed, lower-case."""
  import ftfy  # a dependency of this pipeline only

  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


def _byte_symbols() -> list[str]:
  """The 256 printable characters byte-level BPE writes bytes as, in the vocabulary's order: the
  printable bytes themselves, then the others mapped past 255 (OpenAI's and GPT-2's table)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges(path: str) -> list[tuple[str, str]]:
  """OpenAI CLIP's 48,894 merges in rank order, from its BPE file (`.txt.gz`), a CLIP folder's
  `merges.txt` or `tokenizer.json`, or such a file itself."""
  if os.path.isdir(path):
    for name in ("merges.txt", "tokenizer.json", OPENAI_BPE_FILE):
      if os.path.isfile(os.path.join(path, name)):
        return read_merges(os.path.join(path, name))
    raise errors.MissingPathError(f"{path} holds no CLIP BPE: expected merges.txt, tokenizer.json or {OPENAI_BPE_FILE}")
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"data.tokenizer={path}: no such file or folder")
  try:
    if path.endswith(".json"):
      with open(path, encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
      pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    else:
      opener = gzip.open if path.endswith(".gz") else open
      with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
      pairs = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#version")]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.BadInputError(f"{path} is not a CLIP BPE merges file: {e}") from e
  if len(pairs) < NUM_MERGES or any(len(p) != 2 for p in pairs[:NUM_MERGES]):
    raise errors.BadInputError(f"{path} holds {len(pairs)} merges, not CLIP's {NUM_MERGES:,}")
  return pairs[:NUM_MERGES]


def field_tokenizer(path: str) -> tokenizers.Tokenizer:
  """The field's BPE (module docstring) from the CLIP BPE at `path`: 49,408 ids, mask 49405."""
  merges = read_merges(path)[:-1]  # the last merge dropped: its id is the mask token's
  symbols = _byte_symbols()
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [MASK, SOT, EOT]
  assert len(vocab) == VOCAB_SIZE, len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                        end_of_word_suffix="</w>", continuing_subword_prefix=""))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (MASK, SOT, EOT)])
  return tok
