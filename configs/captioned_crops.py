"""The method on a collection of automatically captioned person crops (LUPerson-MLLM, SYNTH-PEDES,
WebPerson-5M style: images with captions, no identity labels, no splits), read as distributed —
a manifest folder or archive (JSONL or CSV) or WebDataset tar shards (data_prep/captioned_crops.py).
The collection is only trained on; the best epoch is selected on a benchmark's val split and the run
reports on its test split, both read with the run's tokenizer and transforms (cross-domain evaluators):

  python -m dgia_jax.main --config configs/captioned_crops.py --workdir runs/crops \\
      --config.data.manual_dir=/path/to/collection --config.evals.val.manual_dir=/path/to/CUHK-PEDES \\
      --config.evals.test.manual_dir=/path/to/CUHK-PEDES \\
      --config.model.init_from=/path/to/clip-vit-base-patch16 --config.data.tokenizer=/path/to/clip-vit-base-patch16

The model, input and schedule are configs/cuhk_pedes.py's. Without identities the relation rule's
absolute thresholds cannot be tuned on any id, and with the code's recipe they relate every pair of a
batch within epochs (docs/RESULTS.md), so the in-batch relations here are mutual nearest neighbours
within the batch (`relations.rule="mutual_topk"`), which can relate at most `relations.topk` pairs
per row; the log names a collapse all the same. Relation precision cannot be measured without ids: the
log says so instead of printing zeros.
"""

import os

import ml_collections

from dgia_jax.common import config_files


def get_config():
  c = config_files.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuhk_pedes.py"))
  c.name = c.data.name = "captioned_crops"
  c.data.manual_dir = ""  # required: the collection (a manifest folder or archive, or WebDataset shards)
  c.data.holdout_val_ids = 0  # no ids to hold out: validation is a benchmark's val split
  c.evals.val = ml_collections.ConfigDict(dict(type="cross_domain", dataset="cuhk_pedes", manual_dir="",
                                               split="val", every="epoch"))
  c.evals.test = ml_collections.ConfigDict(dict(type="cross_domain", dataset="cuhk_pedes", manual_dir="",
                                                split="test", every="epoch"))
  c.relations.rule = "mutual_topk"
  return c
