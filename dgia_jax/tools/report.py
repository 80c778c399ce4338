"""Writes the visual top-k report of an export (`dgia_jax.report`): sampled captions, their top-k
images with scores, the caption's person in green and others in red.

  python -m dgia_jax.tools.report --emb emb/ --num_queries 8 -k 5 --out report/
"""

import os

from absl import flags

from dgia_jax import cli
from dgia_jax.gallery import exports, report

_EMB = flags.DEFINE_string("emb", None, "Export directory (python -m dgia_jax.tools.export).")
_OUT = flags.DEFINE_string("out", None, "Directory the report is written to.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 8, "Captions to show.", lower_bound=1,
                                    upper_bound=report.MAX_QUERIES)
_K = flags.DEFINE_integer("k", 5, "Results per caption.", lower_bound=1, upper_bound=report.MAX_K)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the caption sample.")
flags.mark_flags_as_required(["emb", "out"])


def main(argv):
  cli.start(argv)
  found = report.write_report(exports.load(_EMB.value), _OUT.value, _NUM_QUERIES.value, _K.value, _SEED.value)
  print(f"wrote {os.path.join(_OUT.value, report.HTML_FILE)} and {report.PNG_FILE}: {len(found['queries'])} "
        f"captions, Rank-1 hits {int(found['hit'][:, 0].sum())}")


if __name__ == "__main__":
  cli.run(main)
