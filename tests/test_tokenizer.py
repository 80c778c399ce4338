import numpy as np
import pytest

from dgia_jax.data import tokenizer as tokenizer_lib


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


def test_special_tokens_are_distinct(tok):
  ids = {tok.sot_id, tok.eot_id, tok.pad_id, tok.mask_id}
  assert len(ids) == 4 and max(ids) < tok.vocab_size


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_caption_is_refused(tok, bad):
  with pytest.raises(ValueError, match="caption 1 is empty"):
    tok.encode(["a man", bad])
