"""Metric records to JSONL and TensorBoard, and the curves."""

import glob
import os

import pytest

from dgia_jax.run import reporting, rundir
from tests import helpers


def _tensorboard_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} read back from the run's TensorBoard event files (TFRecord framing: length,
  its CRC, the Event proto, its CRC), later files overriding earlier ones as TensorBoard shows them."""
  import struct

  from tensorboardX.proto import event_pb2

  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_shows_the_loss_terms_rate_relations_and_every_evaluation(trained):
  _, workdir, _ = trained
  scalars = _tensorboard_scalars(workdir)
  for tag in ("train/loss", "train/loss_itc", "train/loss_lrc", "train/loss_iasc", "train/loss_gsrc", "train/lr",
              "train/lrc_precision", "relations/lrc_precision", "relations/gsrc_precision", "test/t2i/R1",
              "test/t2i/mAP", "val/t2i/R1", "val/i2t/mINP"):
    assert tag in scalars, (tag, sorted(scalars))
  checked = 0
  for record in rundir.RunDir(workdir).records():
    for tag, value in reporting.tensorboard_scalars(record).items():
      assert scalars[tag][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, record["step"])
      checked += 1
  assert checked > 100


def test_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
  helpers.run_python(f"""
import sys
from dgia_jax.run import reporting
writer = reporting.summary_writer({str(tmp_path)!r}, None)
writer.add_scalar("train/loss", 1.5, 1)
writer.close()
assert "torch" not in sys.modules
import torch  # hidden only while tensorboardX was imported
assert torch.zeros(1).shape == (1,)
""")


def test_curves_are_redrawn_when_records_changed_and_at_most_every_interval_before_the_end(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(reporting, "plot_curves", lambda records, path, title: drawn.append(len(records)))
  clock = [100.0]
  curves = reporting.Curves(str(tmp_path / "curves.png"), "run", every_seconds=30, clock=lambda: clock[0])
  records = [{"kind": "train", "step": 1, "loss": 2.0}]
  curves.draw(records)  # within 30 s of the start: not yet
  clock[0] += 31
  curves.draw(records)
  records.append({"kind": "train", "step": 2, "loss": 1.0})
  clock[0] += 10
  curves.draw(records)  # 10 s after the last drawing
  curves.draw(records, end=True)  # the end: drawn whatever the interval
  curves.draw(records, end=True)  # nothing new
  clock[0] += 100
  curves.draw(records)
  assert drawn == [1, 2]


def test_curves_png_of_records_with_and_without_evaluations(tmp_path):
  records = [{"kind": "train", "step": s, "loss": 5.0 / s, "loss_itc": 0.0} for s in range(1, 6)]
  for name, extra in (("train_only", []), ("with_eval", [{"kind": "eval", "step": 5, "epoch": 1, "split": "val",
                                                           "t2i": {"R1": 50.0, "mAP": 40.0}}])):
    path = str(tmp_path / f"{name}.png")
    reporting.Curves(path, "run", every_seconds=0).draw(records + extra)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
