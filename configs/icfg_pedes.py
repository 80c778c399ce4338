"""CUHK-PEDES's settings (configs/cuhk_pedes.py) on ICFG-PEDES (`ICFG-PEDES.json` + `imgs/`).

ICFG-PEDES has no val split: the best epoch is picked on 200 identities held out of train
(`data.holdout_val_ids`; 3,102 train identities remain 2,902), never on test. (The authors' code
trains on all 3,102 and picks its epoch on test; `--config.data.holdout_val_ids=0
--config.evals.val.every=off --config.eval.select=` trains on all of them and reports the last epoch.)

  python -m dgia_jax.main --config configs/icfg_pedes.py --workdir runs/icfg_pedes \\
      --config.data.manual_dir=/path/to/ICFG-PEDES \\
      --config.model.init_from=/path/to/clip-vit-base-patch16 \\
      --config.data.tokenizer=/path/to/clip-vit-base-patch16
"""

import os

from dgia_jax.common import config_files


def get_config():
  c = config_files.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuhk_pedes.py"))
  c.name = c.data.name = "icfg_pedes"
  c.data.holdout_val_ids = 200
  return c
