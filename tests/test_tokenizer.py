import importlib.util
import logging
import os

import numpy as np
import pytest

from dgia_jax.common import errors
from dgia_jax.data import field_text
from dgia_jax.data import tokenizer as tokenizer_lib
from tests import clip_checkpoints


@pytest.fixture(scope="module")
def tok():
  texts = ["a man in a red coat", "a woman with a black backpack", "blue trousers and white shoes"] * 5
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_bpe(texts, vocab_size=200), context_length=8)


def test_layout_is_sot_tokens_eot_pad(tok):
  out = tok.encode(["a red coat"])
  row = out[0]
  assert out.dtype == np.int32 and out.shape == (1, 8)
  assert row[0] == tok.sot_id
  eot = int(np.argmax(row == tok.eot_id))
  assert eot >= 2 and (row[eot + 1:] == tok.pad_id).all()
  assert tok.decode(row).replace(" ", "") == "aredcoat"


def test_truncation_keeps_end_of_text(tok):
  row = tok.encode(["a man in a red coat with a black backpack and blue trousers and white shoes"])[0]
  assert row[0] == tok.sot_id and row[-1] == tok.eot_id
  assert tok.eot_id not in row[:-1] and tok.pad_id not in row


def test_truncation_is_reported_with_the_count_and_the_longest_caption(tok, caplog):
  longest = "a man in a red coat with a black backpack and blue trousers and white shoes"
  with caplog.at_level(logging.WARNING):
    tok.encode(["a red coat", longest, "a man in a red coat with"], "train split")
  [message] = [r.getMessage() for r in caplog.records]
  assert message.startswith("train split: 2 of 3 captions are longer than 6 tokens (context_length 8 less SOT and "
                            "EOT) and were truncated to 6; the longest: caption 1, ")
  assert message.endswith(f" tokens: {longest!r}")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tok.encode(["a red coat", "a man in a red coat"])  # 5 and 6 pieces: nothing cut
  assert not caplog.records


def test_special_tokens_are_distinct(tok):
  ids = {tok.sot_id, tok.eot_id, tok.pad_id, tok.mask_id}
  assert len(ids) == 4 and max(ids) < tok.vocab_size
  assert tok.num_appended == 0  # our own vocabulary has a mask token


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_caption_is_refused(tok, bad):
  with pytest.raises(ValueError, match="caption 1 is empty"):
    tok.encode(["a man", bad])


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_clip_folder_encodes_as_clip_with_an_appended_mask_token(tmp_path, files):
  texts = ["The man in the RED coat!", "and", "the red coat and the man and the coat"]
  hf = clip_checkpoints.write_clip_tokenizer(str(tmp_path), tokenizer_json=False)
  ref = hf(texts, padding="max_length", max_length=8, truncation=True)["input_ids"]
  if files == "tokenizer.json":
    hf.save_pretrained(str(tmp_path))  # carries the padding and truncation just used: ours must ignore them
    (tmp_path / "vocab.json").unlink()
  tok = tokenizer_lib.Tokenizer.from_file(str(tmp_path), context_length=8)
  out = tok.encode(texts)
  assert (tok.sot_id, tok.eot_id) == (hf.bos_token_id, hf.eos_token_id) == (len(hf) - 2, len(hf) - 1)
  for row, expected in zip(out, ref):
    end = expected.index(hf.eos_token_id) + 1
    assert row[:end].tolist() == expected[:end]  # SOT, pieces, EOT as transformers' CLIPTokenizer
    assert (row[end:] == 0).all()  # then OpenAI's zero padding
  assert out[2, -1] == tok.eot_id and tok.eot_id not in out[2, :-1]  # truncated, EOT kept
  # CLIP has no mask token: it is appended after the vocabulary, every CLIP id unchanged.
  assert tok.num_appended == 1 and tok.mask_id == len(hf) == tok.vocab_size - 1
  assert tok.decode(out[0]) == "the man in the red"
  masked = out[0].copy()
  masked[2] = tok.mask_id
  assert tok.decode(masked) == "the <|mask|> in the red"


def _openai_reference():
  """OpenAI's own CLIP tokenizer (the `clip` package's `simple_tokenizer.py` and BPE file, loaded
  without the package, which needs torchvision), changed as the field's code changes it: the last
  merge (`jekyll</w>`) dropped from the vocabulary — and here from the merges too, where the field's
  code keeps it and raises KeyError on "jekyll" — its id 49405 the mask token, matched in text."""
  import regex

  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("OpenAI's clip package is not installed (make test installs it)")
  root = spec.submodule_search_locations[0]
  module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", os.path.join(root, "simple_tokenizer.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  bpe = os.path.join(root, field_text.OPENAI_BPE_FILE)
  ref = module.SimpleTokenizer(bpe)
  last = max(ref.bpe_ranks, key=ref.bpe_ranks.get)
  del ref.bpe_ranks[last]
  del ref.encoder["".join(last)]
  ref.encoder[field_text.MASK] = field_text.MASK_ID
  ref.cache[field_text.MASK] = field_text.MASK
  ref.pat = regex.compile(r"<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                          r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
  return ref, bpe


TRICKY = ["A woman in a red coat carrying a black backpack.", "He’s wearing “curly quotes” &amp; a café-au-lait scarf",
          "naïve ÉLAN Ångström", "mojibake: the man doesnâ€™t carry a bag", "&amp;amp; escaped twice", "  lots   of\n\t"
          "white\u00a0space  ", "The man's bag, it's 100% cotton!!! 3 pockets", "emoji 😀 and 中文 and العربية",
          "dr jekyll and mr hyde, JEKYLL's jekylls", "a <|mask|> in the text", "x" * 400,
          " ".join(["a man in a long grey coat with black trousers"] * 12)]


def test_the_irra_text_pipeline_gives_openais_ids_as_the_field_changes_them():
  ref, bpe = _openai_reference()
  tok = tokenizer_lib.Tokenizer.from_file(bpe, 77, pipeline="irra")
  assert (tok.vocab_size, tok.num_appended, tok.mask_id, tok.sot_id, tok.eot_id, tok.pad_id) == \
      (49408, 0, 49405, 49406, 49407, 0)
  for text in TRICKY:
    expected = [49406] + ref.encode(text)[:75] + [49407]  # the field's `tokenize`: 77 ids, EOT kept when cut
    row = tok.encode([text])[0]
    assert row[:len(expected)].tolist() == expected, text
    assert (row[len(expected):] == 0).all()
  jekyll = tok.encode(["jekyll"])[0]
  assert jekyll[1:3].tolist() == [43893, 865] and 49405 not in jekyll.tolist()  # "jeky" "ll</w>": never the mask


def test_the_irra_text_pipeline_reads_a_clip_folder_as_the_bpe_file(tmp_path):
  """vocab.json + merges.txt, as a Hugging Face CLIP folder ships them, give the same ids."""
  ref, bpe = _openai_reference()
  merges = field_text.read_merges(bpe)
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  folder = tokenizer_lib.Tokenizer.from_file(str(tmp_path), 77, pipeline="irra")
  gz = tokenizer_lib.Tokenizer.from_file(bpe, 77, pipeline="irra")
  np.testing.assert_array_equal(folder.encode(TRICKY), gz.encode(TRICKY))
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
  with pytest.raises(errors.BadInputError, match="holds 1 merges, not CLIP's 48,894"):
    tokenizer_lib.Tokenizer.from_file(str(tmp_path), 77, pipeline="irra")
