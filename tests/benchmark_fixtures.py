"""Tiny CUHK-PEDES, ICFG-PEDES and RSTPReid folders in each benchmark's original layout."""

import json
import os

from PIL import Image

from data_prep import benchmarks

SPLIT_IDS = {"train": 3, "val": 2, "test": 2}  # identities per split
VIEWS = 2  # images per identity


def _image_path(name: str, split: str, pid: int, view: int) -> str:
  """A path relative to imgs/, shaped as the benchmark's own."""
  if name == "cuhk_pedes":  # sub-collections, .jpg and .png mixed
    return f"CUHK03/{pid}_{view}.png" if view else f"cam_a/{pid:03d}_{view}.jpg"
  if name == "icfg_pedes":  # imgs/{train,test}/<id>/...
    return f"{split}/{pid:04d}/{pid:04d}_{view:03d}_05_0303morning_0011_1.jpg"
  return f"{pid:04d}_c{view + 5}_{view:04d}.jpg"  # rstpreid: flat


def _colour(pid: int, view: int) -> tuple[int, int, int]:
  return (40 * pid % 256, 60 * view + 30, 200 - 10 * pid % 256)


def write_fixture(root: str, name: str, json_name: str | None = None) -> list[dict]:
  """A tiny benchmark in `name`'s original layout under `root`; returns its annotation records.

  Splits interleave in the file (as they may in the originals); CUHK-PEDES ids start at 1.
  """
  layout = benchmarks.BUILDERS[name].LAYOUT
  pid = 1 if name == "cuhk_pedes" else 0
  by_split = {}
  for split in layout.splits:
    by_split[split] = []
    for _ in range(SPLIT_IDS[split]):
      for view in range(VIEWS):
        path = _image_path(name, split, pid, view)
        captions = [f"person {pid} view {view} caption {j} wears a red coat"
                    for j in range(1 if name == "icfg_pedes" else 1 + (pid + view) % 2 + 1)]
        anno = {"split": split, "captions": captions, "id": pid, layout.path_key: path}
        if name != "rstpreid":
          anno["processed_tokens"] = [c.split() for c in captions]
        full = os.path.join(root, "imgs", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.new("RGB", (6, 12), _colour(pid, view)).save(full)
        by_split[split].append(anno)
      pid += 1
  annos = [a for group in zip(*by_split.values()) for a in group]  # round-robin over splits
  annos += [a for split in by_split.values() for a in split[min(map(len, by_split.values())):]]
  write_annotations(root, name, annos, json_name)
  return annos


def write_annotations(root: str, name: str, annos: list, json_name: str | None = None) -> None:
  with open(os.path.join(root, json_name or benchmarks.BUILDERS[name].LAYOUT.annotation_files[0]), "w") as f:
    json.dump(annos, f)
