"""Every config key's domain, in one table, checked before a run writes anything.

`check(config)` walks every leaf of an experiment config: a key the table does not know is refused
(a typo in a config file), and so is a value outside its key's domain (`train.lr=inf`,
`loss.temperature=0`, `relations.image_threshold=5`), each named with its key; then the rules that
tie keys together (`RELATIONS`). Each key also says whether a rerun into an existing run may change
it (`Key.rerun`): keys that change what is trained may not (`conflicts`), keys of policy and
plumbing may (a new data path, a longer log interval, stopping on collapse).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ml_collections

from dgia_jax.common import errors
from dgia_jax.data.pipeline import RESIZE_FILTERS
from dgia_jax.evaluation.metrics import METRIC_NAMES
from dgia_jax.method import perturb
from dgia_jax.models.clip import ACTIVATIONS, ATTENTION_IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a key may take: `holds(value)`, described as `text` ("a finite number > 0")."""

  text: str
  holds: Callable[[object], bool]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int = 0, high: int | None = None) -> Domain:
  text = f"a whole number ≥ {low}" if high is None else f"a whole number in [{low}, {high}]"
  return Domain(text, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Domain:
  """A finite number in the interval; `*_open` leaves that end out."""
  if math.isinf(low) and math.isinf(high):
    text = "a finite number"
  elif math.isinf(high):
    text = f"a finite number {'>' if low_open else '≥'} {low:g}"
  else:
    text = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

  def holds(v) -> bool:
    if not _is_number(v) or not math.isfinite(v):
      return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

  return Domain(text, holds)


def choice(*values) -> Domain:
  return Domain(f"one of {', '.join(map(repr, values))}", lambda v: v in values and type(v) is type(values[0]))


def whole_numbers(count: int, low: int = 1) -> Domain:
  return Domain(f"{count} whole numbers ≥ {low}",
                lambda v: isinstance(v, (tuple, list)) and len(v) == count and all(_is_int(x) and x >= low for x in v))


BOOL = Domain("True or False", lambda v: isinstance(v, bool))
TEXT = Domain("a string", lambda v: isinstance(v, str))
NAME = Domain("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
PROBABILITY = number(0.0, 1.0)
COSINE = number(-1.0, 1.0)
POSITIVE = number(0.0, low_open=True)
NON_NEGATIVE = number(0.0)
COUNT = integer(1)
EPOCH = integer(1)
SEED = integer(0, 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Key:
  """A config key's domain; `rerun`: a rerun into an existing run may change it."""

  domain: Domain
  rerun: bool = False


def _keys(rerun: bool = False, **domains: Domain) -> dict[str, Key]:
  return {name.replace("__", "."): Key(domain, rerun) for name, domain in domains.items()}


def _section(section: str, keys: dict[str, Key]) -> dict[str, Key]:
  return {f"{section}.{name}": key for name, key in keys.items()}


KEYS: dict[str, Key] = {
    **_keys(seed=SEED),
    **_keys(rerun=True, name=TEXT),
    **_section("data", {
        **_keys(name=NAME, image_size=whole_numbers(2), resize=choice(*RESIZE_FILTERS),
                context_length=integer(3, 4096), tokenizer=TEXT, text_pipeline=choice("hf", "irra"),
                train_split=NAME, val_split=TEXT,
                holdout_val_ids=integer(0), holdout_seed=SEED,
                synthetic__num_ids=whole_numbers(3), synthetic__views_per_id=COUNT,
                synthetic__captions_per_image=COUNT, synthetic__sibling_prob=PROBABILITY,
                synthetic__mention_prob=PROBABILITY, synthetic__seed=SEED,
                synthetic__tokenizer_vocab_size=integer(32)),
        # Where the data lies and how it is read: a moved data folder, more threads.
        **_keys(rerun=True, data_dir=NAME, prepare=BOOL, num_threads=integer(1, 256), manual_dir=TEXT, strict=BOOL,
                allow_paths_outside=BOOL),
    }),
    **_section("model", {
        **_keys(embed_dim=COUNT, vision__patch_size=COUNT, vision__width=COUNT, vision__layers=COUNT,
                vision__heads=COUNT, text__width=COUNT, text__layers=COUNT, text__heads=COUNT,
                activation=choice(*ACTIVATIONS), dtype=choice("float32", "bfloat16"), init_from=TEXT),
        # The same function computed another way, or where a start was kept.
        **_keys(rerun=True, remat=BOOL, attention=choice(*ATTENTION_IMPLEMENTATIONS), init_config=TEXT, init_cache_dir=TEXT),
    }),
    **_section("loss", _keys(temperature=POSITIVE, relation_eps=number(0.0, 1.0, low_open=True), itc=BOOL, lrc=BOOL,
                             iasc=BOOL, gsrc=BOOL)),
    **_section("relations", {
        **_keys(image_threshold=COSINE, text_threshold=COSINE, weight=number(), compare=choice(">=", ">"),
                rule=choice("threshold", "mutual_topk"), topk=integer(1, 1024),
                oracle=BOOL, start_epoch=EPOCH, clusters__enabled=BOOL, clusters__mode=choice("or", "replace"),
                clusters__start_epoch=EPOCH, clusters__every_epochs=COUNT, clusters__k1=COUNT, clusters__k2=COUNT,
                clusters__eps=number(0.0, 1.0, low_open=True), clusters__min_samples=COUNT,
                clusters__ann_threshold=COUNT),
        # What the run does when its relations collapse: a policy, not what is trained.
        **_keys(rerun=True, on_collapse=choice("warn", "stop"), collapse_share=number(0.0, 1.0, low_open=True)),
    }),
    **_section("iasc", _keys(mask_prob=PROBABILITY, pad=integer(0), erase_prob=PROBABILITY,
                             erase_fill=choice(*perturb.ERASE_FILLS), mask_first=BOOL,
                             relations=choice("clean", "perturbed"))),
    **_section("gsrc", _keys(k=integer(1, 1024), threshold=COSINE, alpha=PROBABILITY, start_epoch=EPOCH,
                             candidates=choice("exclude_self", "skip_top1"), rows=choice("batch", "batch+bank"),
                             bank_features=choice("normalised", "raw"), bank_dtype=choice("float32", "bfloat16"))),
    **_section("train", {
        **_keys(batch_size=COUNT, lr=POSITIVE, min_lr=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE,
                warmup_factor=number(0.0, 1.0, low_open=True), schedule_per=choice("step", "epoch"),
                weight_decay=NON_NEGATIVE, bias_lr_factor=POSITIVE, b1=number(0.0, 1.0, high_open=True),
                b2=number(0.0, 1.0, high_open=True), eps=POSITIVE, grad_clip=NON_NEGATIVE),
        # The same gradient computed another way; a longer run (the schedule then continues over the
        # new length); policies and logging.
        **_keys(rerun=True, micro_batch=integer(0), epochs=COUNT, on_nonfinite=choice("skip", "stop"),
                log_every=COUNT),
    }),
    **_section("eval", _keys(rerun=True, batch_size=COUNT, every_epochs=COUNT, select=TEXT,
                             select_metric=choice(*METRIC_NAMES), report=NAME)),
    # Evaluators: any name (`*`); `type` is a module of dgia_jax.evaluation, the rest its settings.
    **_section("evals.*", _keys(rerun=True, type=NAME, split=NAME, every=choice("epoch", "last", "off"), dataset=NAME,
                                manual_dir=TEXT)),
    **_section("checkpoint", _keys(rerun=True, every_steps=COUNT, keep=COUNT)),
}


def _relations(c: ml_collections.ConfigDict) -> list[str]:
  """Rules between keys, as problems naming them."""
  problems = []
  patch = c.model.vision.patch_size
  if any(side % patch for side in c.data.image_size):
    problems.append(f"data.image_size={tuple(c.data.image_size)} must be a multiple of model.vision.patch_size={patch}")
  for tower in ("vision", "text"):
    t = c.model[tower]
    if t.width % t.heads:
      problems.append(f"model.{tower}.heads={t.heads} must divide model.{tower}.width={t.width}")
  if c.train.min_lr > c.train.lr:
    problems.append(f"train.min_lr={c.train.min_lr} must not exceed train.lr={c.train.lr}")
  mb = c.train.micro_batch
  if mb and c.train.batch_size % mb:
    problems.append(f"train.micro_batch={mb} must divide train.batch_size={c.train.batch_size}, or be 0 (off)")
  if not any(c.loss[t] for t in ("itc", "lrc", "iasc", "gsrc")):
    problems.append("no loss is enabled in config.loss (set one of loss.itc, loss.lrc, loss.iasc, loss.gsrc)")
  runs = [name for name, e in c.evals.items() if e.get("every", "epoch") != "off"]
  for key in ("select", "report"):
    if c.eval[key] and c.eval[key] not in runs:
      problems.append(f"eval.{key}={c.eval[key]!r} names no evaluator of config.evals that runs ({', '.join(runs) or 'none'})")
  for name, e in c.evals.items():
    needs = ("type", "split") + (("dataset",) if e.get("type") == "cross_domain" else ())
    problems += [f"evals.{name}.{k} is missing" for k in needs if k not in e]
  return problems


def key_of(key: str) -> Key | None:
  """The table's entry for dotted `key`, a `*` in the table standing for any one name; None if unknown."""
  if key in KEYS:
    return KEYS[key]
  parts = key.split(".")
  return next((k for pattern, k in KEYS.items() if "*" in pattern and len(pattern.split(".")) == len(parts)
               and all(p in ("*", q) for p, q in zip(pattern.split("."), parts))), None)


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  """{"train.lr": 1e-4, ...}: every leaf of `config` by its dotted key."""
  out = {}
  for name, value in config.items():
    key = f"{prefix}{name}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(leaves(value, f"{key}."))
    else:
      out[key] = value
  return out


def problems_of(config: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with `config`, a line per key: unknown keys, values outside their domain, then
  broken rules between keys (only when every value is in its domain)."""
  problems = []
  for key, value in leaves(config).items():
    known = key_of(key)
    if known is None:
      problems.append(f"{key} is not a config key dgia-jax knows (a typo in the config file?)")
    elif not known.domain.holds(value):
      problems.append(f"{key}={value!r} must be {known.domain.text}")
  return problems or _relations(config)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every key whose value has no meaning (`problems_of`)."""
  problems = problems_of(config)
  if problems:
    raise errors.ConfigError(problems[0] if len(problems) == 1 else
                             f"{len(problems)} config values have no meaning:\n  " + "\n  ".join(problems))


# Keys a saved run may hold that no longer exist, each dropped (None) or read as today's keys and values.
RETIRED = {"data.eval_split": None, "eval.test_each_epoch": None,  # now config.evals (rerun keys)
           # False is today's mask_first=False; True (mask the first token of a caption left unmasked)
           # is no rule of today's: kept, so that a rerun names it.
           "iasc.mask_at_least_one": lambda v: {"iasc.mask_first": False} if v is False else {"iasc.mask_at_least_one": v}}
# Keys added since a run may have been saved, with the value the run behaved as
# (None: the run is taken to have had the value the config has: a key that only matters with another one's
# new value, or only past sizes the earlier code did not reach.)
ABSENT = {"data.text_pipeline": "hf", "relations.rule": "threshold", "relations.topk": None, "gsrc.bank_dtype": "float32",
          "relations.clusters.ann_threshold": None}


def _as_today(saved: dict) -> dict:
  """A saved run's config leaves in today's keys (`RETIRED`, `ABSENT`)."""
  out = {k: v for k, v in ABSENT.items() if v is not None}
  for key, value in saved.items():
    if key in RETIRED:
      out.update(RETIRED[key](value) if RETIRED[key] else {})
    else:
      out[key] = value
  return out


def conflicts(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """The keys where `config` differs from a run's `saved` one and a rerun may not change them."""
  old, new = _as_today(leaves(saved)), leaves(config)
  for key, absent in ABSENT.items():
    if absent is None and key not in old:
      new.pop(key, None)
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON gives lists)
  out = []
  for key in sorted(set(old) | set(new)):
    if key_of(key) is not None and key_of(key).rerun:
      continue
    if norm(old.get(key, "<absent>")) != norm(new.get(key, "<absent>")):
      out.append(f"{key}: the run has {old.get(key, '<absent>')!r}, this config {new.get(key, '<absent>')!r}")
  return out
