"""CUHK-PEDES's settings (configs/cuhk_pedes.py) on RSTPReid (`data_captions.json` + `imgs/`), for 16
epochs as the authors' code trains it (`train_rstp.sh`).

  python -m dgia_jax.main --config configs/rstpreid.py --workdir runs/rstpreid \\
      --config.data.manual_dir=/path/to/RSTPReid \\
      --config.model.init_from=/path/to/clip-vit-base-patch16 \\
      --config.data.tokenizer=/path/to/clip-vit-base-patch16
"""

import os

from dgia_jax.common import config_files


def get_config():
  c = config_files.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuhk_pedes.py"))
  c.name = c.data.name = "rstpreid"
  c.train.epochs = 16
  return c
