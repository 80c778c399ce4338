"""What every experiment shares: the method's switches, the trainer's, the evaluation's.

An experiment's `get_config()` starts from `get_config()` here and adds its data set
(`data.name` and that set's own keys) and the values it changes; `clip_vit_b16` turns a config
into the field's CLIP ViT-B/16 fine-tuning shape. Nothing here is deleted by an experiment.
"""

import ml_collections

from dgia_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # the experiment's: synthetic_persons, cuhk_pedes, icfg_pedes, rstpreid
  c.data.data_dir = "data/tfds"
  c.data.prepare = True  # build the data set if it is missing
  c.data.image_size = (96, 32)  # height, width
  c.data.resize = "bicubic"  # or "bilinear" (torchvision's default, the reference code's)
  c.data.context_length = 48
  c.data.tokenizer = ""  # "" = the tokenizer saved beside the data
  # "hf": the tokenizer's own cleaning (Hugging Face's); "irra": the field's code's text pipeline on
  # CLIP's BPE (ftfy + HTML unescaped twice, mask token id 49405: dgia_jax/data/field_text.py), what its
  # released checkpoints were trained on.
  c.data.text_pipeline = "hf"
  c.data.train_split = "train"
  # Model selection happens on validation identities, never on the test split: the data
  # set's own val split, or (holdout_val_ids > 0) that many identities held out of train.
  c.data.val_split = "val"
  c.data.holdout_val_ids = 0
  c.data.holdout_seed = 0
  c.data.num_threads = 4
  # A benchmark's image paths must lie inside its imgs/ folder (no `..`, no absolute path, no link
  # out of it); True lets them point anywhere.
  c.data.allow_paths_outside = False

  c.model = presets.small()

  # Losses (METHOD.md): L = L_itc + L_rc_b (lrc) + L_rc_h (iasc) + L_rc_g (gsrc), each switchable.
  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.02
  # ε of the relation SDM's log(q + ε): the floor on unrelated columns, so how hard negatives are
  # pushed (IRRA's 1e-8; the reference code's 1e-6).
  c.loss.relation_eps = 1e-8
  c.loss.itc = True
  c.loss.lrc = True
  c.loss.iasc = True
  c.loss.gsrc = True

  # In-batch relations (LRC and IASC targets): pairs related when both modalities agree.
  c.relations = ml_collections.ConfigDict()
  c.relations.image_threshold = 0.8
  c.relations.text_threshold = 0.8
  c.relations.weight = 0.1  # lambda: target logit of a related pair (own partner: 1)
  # Related when a cosine is ">=" the threshold, or ">" (the reference code's); for the global
  # candidates too.
  c.relations.compare = ">="
  c.relations.oracle = False  # measurement only: true person ids as the relations
  # "threshold": the paper's rule (both cosines over their thresholds); "mutual_topk": the same, kept
  # only between mutual top-`topk` neighbours of the batch by the lower of the two cosines: a row is
  # related to at most `topk` others, so the relations cannot grow to the whole batch (a rule for data
  # without ids to tune thresholds on: docs/RESULTS.md).
  c.relations.rule = "threshold"
  c.relations.topk = 2
  # A collapse: an epoch whose in-batch relations per batch row pass this share of the other rows
  # of the batch (1: every pair related). The log names it; "stop" also ends the run there.
  c.relations.collapse_share = 0.5
  c.relations.on_collapse = "warn"
  # Agreement relations need a spread-out feature space: pretrained CLIP has one from the
  # start (paper: epoch 1, thresholds 0.7). A model trained from scratch does not: measured on
  # this data, relations switched on at epoch 3-4 with thresholds 0.7-0.9 snowball (every
  # in-batch pair related within an epoch, R1 falls below ITC), so here they start late and strict.
  c.relations.start_epoch = 7
  # Beyond the paper (docs/CLUSTERING.md): pseudo identities from clustering every training
  # image (sparse k-reciprocal Jaccard distance + DBSCAN) relate the pairs of one cluster in
  # the in-batch targets, OR-ed with the agreement relations or replacing them.
  c.relations.clusters = ml_collections.ConfigDict(dict(
      enabled=False, mode="or", start_epoch=5, every_epochs=1,
      # The field's k1=30, k2=6, eps=0.6, min_samples=4 suit CUHK-PEDES; with 4 views per
      # identity here they merge the 2,000 training images into ~26 clusters (pair precision
      # 0.2% on an ITC model's features). Smaller neighbourhoods (measured: pair precision 25%,
      # ~440 clusters, 41% outliers) fit this set.
      k1=8, k2=2, eps=0.45, min_samples=2,
      # Images past which the k-NN graph is approximate (k-means partitions; docs/SCALE.md), not exact (O(N²)).
      ann_threshold=200_000))

  # Information-asymmetric partners (IASC-CL).
  c.iasc = ml_collections.ConfigDict()
  c.iasc.mask_prob = 0.5
  c.iasc.pad = 3  # pixels; 10 at 384x128, scaled to the 96x32 synthetic images
  c.iasc.erase_prob = 0.5
  # What an erased box holds in normalised units: "zero" (the mean colour) or "mean" (the
  # normalisation mean's values, light grey, as the reference code passes torchvision's value).
  c.iasc.erase_fill = "zero"
  c.iasc.mask_first = False  # True: the first content token of every caption is masked too (the code's rule)
  # Where the perturbed pairs' in-batch relations come from: "perturbed" (METHOD.md's literal
  # reading: agreement of the masked captions and erased images) or "clean" (the un-perturbed
  # pairs' relations; partner i is pair i, so it shares pair i's identity). Measured on this
  # set: perturbed-feature relations were 1.7 % precise (masked captions look alike).
  c.iasc.relations = "clean"

  # Global relations (GSRC-FR): memory banks searched with the image as anchor.
  c.gsrc = ml_collections.ConfigDict()
  c.gsrc.k = 3
  c.gsrc.threshold = 0.7
  c.gsrc.alpha = 0.9  # EMA weight of the new feature
  c.gsrc.start_epoch = 3  # earlier epochs only fill the banks (paper: 2)
  # Candidates: the top k excluding the pair's own row ("exclude_self"), or ranks 2 .. k + 1
  # whatever rank 1 is ("skip_top1", the reference code's).
  c.gsrc.candidates = "exclude_self"
  # The loss: B rows over [batch | candidates] columns ("batch", the paper's Eq. 17), or B + M
  # rows, the selected bank rows being queries too ("batch+bank", the reference code's).
  c.gsrc.rows = "batch"
  # The banks keep L2-normalised features, renormalised after each update ("normalised"), or
  # the raw features' running mean, normalised when read ("raw", the reference code's).
  c.gsrc.bank_features = "normalised"
  # The banks' storage: "float32", or "bfloat16" (half the memory: two 5 M x 512 banks 10 GB instead of
  # 20 GB; every computation on their rows stays float32; docs/SCALE.md measures the candidates it changes).
  c.gsrc.bank_dtype = "float32"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  # Rows per micro-batch (0: off): the step's gradient is the whole batch's, computed with one
  # micro-batch's activations live at a time (dgia_jax/training/step.py); a divisor of batch_size and a
  # multiple of the device count.
  c.train.micro_batch = 0
  c.train.epochs = 10
  c.train.lr = 5e-4
  c.train.min_lr = 0.0
  c.train.warmup_epochs = 1.0
  c.train.warmup_factor = 0.1
  c.train.schedule_per = "step"  # or "epoch": the rate held through each epoch (the reference code's)
  c.train.weight_decay = 4e-5
  c.train.bias_lr_factor = 2.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8  # Adam's ε; the reference code's 1e-3 (docs/REPRODUCING.md)
  c.train.grad_clip = 0.0
  c.train.on_nonfinite = "skip"  # a step with non-finite loss/gradients: "skip" it (counted) or "stop"
  c.train.log_every = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.every_epochs = 1
  c.eval.select = "val"  # the evaluator whose text→image `select_metric` picks the best epoch ("": none)
  c.eval.select_metric = "R1"
  c.eval.report = "test"  # the evaluator whose last epoch is the run's final figures
  # Evaluators (dgia_jax/evaluation/evaluators.py): a type (a module of dgia_jax.evaluation) and its
  # settings; `every`: "epoch" (every evaluation epoch), "last" (the last epoch, and the best one's
  # figures), "off". E.g. another benchmark's test split every epoch:
  #   c.evals.icfg = dict(type="cross_domain", dataset="icfg_pedes", manual_dir="/path/ICFG-PEDES", split="test")
  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict(dict(type="retrieval", split="val", every="epoch"))
  c.evals.test = ml_collections.ConfigDict(dict(type="retrieval", split="test", every="epoch"))  # curves; never selects

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 2
  return c


def synthetic_persons(c: ml_collections.ConfigDict, **sizes) -> ml_collections.ConfigDict:
  """`c` reading the embedded synthetic set (no downloads): the default build is 500 / 50 / 100
  identities (train / val / test) × 4 views × 2 captions, seed 0; `sizes` change it."""
  c.data.name = "synthetic_persons"
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_ids=(500, 50, 100), views_per_id=4, captions_per_image=2, sibling_prob=0.5, mention_prob=0.6,
      seed=0, tokenizer_vocab_size=600))
  c.data.synthetic.update(sizes)
  return c


def clip_vit_b16(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` as the field fine-tunes OpenAI CLIP ViT-B/16: 384×128 images, 77 tokens, and METHOD.md's
  schedule for pretrained CLIP (Adam at 1e-5, 5 warm-up epochs from 1e-6, cosine, 40 epochs,
  batch 64; relations from epoch 1 and the global loss from epoch 2, since a pretrained feature
  space is spread out from the start; the paper's thresholds 0.7; padding 10 at 384×128)."""
  c.data.image_size = (384, 128)
  c.data.context_length = 77  # CLIP's
  c.model = presets.vit_b16()
  c.model.init_from = ""  # required: --config.model.init_from=/path/to/clip
  c.train.update(dict(lr=1e-5, warmup_epochs=5.0, warmup_factor=0.1, epochs=40, batch_size=64))
  c.relations.start_epoch, c.gsrc.start_epoch = 1, 2
  c.relations.image_threshold = c.relations.text_threshold = 0.7
  c.iasc.pad = 10
  return c
