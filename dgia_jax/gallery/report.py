"""Visual top-k report of an export: sample captions and their top-k images, true/false matches marked.

  python -m dgia_jax.tools.report --emb emb/ --num_queries 8 -k 5 --out report/

Queries are captions of the exported split drawn at random (`--seed`), searched with their
exported embeddings over the exported images (`searcher.Searcher`). Ground truth is the split's
person ids: a green border is the caption's person, red another. Images are the exported ones,
read from the data set and checked against the export (`exports.ExportedImages`). Writes into
`--out`, whole or not at all (a failed write leaves the report there before):

  report.html    each query's text and its top-k thumbnails with scores
  report.png     the same as one grid, a row per query (matplotlib)
  images/        the thumbnails the HTML shows, record-<row>.png
"""

from __future__ import annotations

import html
import io
import os
import textwrap

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dgia_jax.common import errors
from dgia_jax.gallery import exports, searcher
from dgia_jax.run import files

HTML_FILE, PNG_FILE, IMAGES_DIR = "report.html", "report.png", "images"
DPI = 100
TEXT_WIDTH, CELL_WIDTH, CELL_HEIGHT = 3.0, 1.3, 2.4  # inches of the PNG grid: query text, one result
COLOURS = {True: "#1a9c3a", False: "#d62728"}


def figure_size(num_queries: int, k: int) -> tuple[float, float]:
  """(width, height) in inches of the PNG grid; times DPI gives its pixels."""
  return TEXT_WIDTH + k * CELL_WIDTH, num_queries * CELL_HEIGHT


MAX_QUERIES, MAX_K = 200, 50  # a page and a picture a person can look at


def top_k_of_sample(emb: exports.Embeddings, num_queries: int, k: int, seed: int) -> dict[str, np.ndarray]:
  """`queries` int64 [N] (caption rows, sorted), their top-k `scores` [N, k], image `rows` [N, k] and `hit` [N, k]."""
  total = emb.manifest["counts"]["texts"]
  queries = np.sort(np.random.default_rng(seed).choice(total, min(num_queries, total), replace=False))
  scores, rows = searcher.Searcher(emb.images).search(searcher.take_rows(emb.texts, queries), k)
  query_pids = np.array([emb.text_index[q]["person_id"] for q in queries])
  image_pids = np.array([item["person_id"] for item in emb.image_index])
  return {"queries": queries, "scores": scores, "rows": rows, "hit": image_pids[rows] == query_pids[:, None]}


def load_images(emb: exports.Embeddings, rows: np.ndarray) -> dict[int, np.ndarray]:
  """uint8 [H, W, 3] of each distinct image row, the exported files' bytes (checked) decoded as stored."""
  exported = exports.ExportedImages(emb)
  return {int(row): np.asarray(Image.open(io.BytesIO(exported.bytes(int(row)))).convert("RGB"))
          for row in np.unique(rows)}


def write_html(emb: exports.Embeddings, found: dict[str, np.ndarray], image_files: dict[int, str], path: str) -> None:
  """report.html: per query, its caption and top-k thumbnails (bordered by match) with scores."""
  m = emb.manifest
  parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>dgia-jax top-k: {html.escape(m['split'])}"
           "</title>\n<style>body{font-family:sans-serif} figure{display:inline-block;margin:4px;text-align:center}"
           " img{height:160px;image-rendering:pixelated;border:5px solid} .hit{border-color:" + COLOURS[True] + "}"
           " .miss{border-color:" + COLOURS[False] + "}</style></head><body>",
           f"<h1>Top-{found['rows'].shape[1]} images of {len(found['queries'])} captions</h1>",
           f"<p>split {html.escape(m['split'])}, {m['counts']['images']} images; checkpoint step {m['step']} of "
           f"{html.escape(m['workdir'])}. Green: the caption's person; red: another person. "
           f"Rank-1 hits: {int(found['hit'][:, 0].sum())} of {len(found['queries'])}.</p>"]
  for q, text_row in enumerate(found["queries"]):
    item = emb.text_index[text_row]
    parts.append(f"<div class=\"query\"><p><b>{q + 1}.</b> {html.escape(item['caption'])} "
                 f"<small>(person {item['person_id']})</small></p>")
    for score, row, hit in zip(found["scores"][q], found["rows"][q], found["hit"][q]):
      parts.append(f"<figure><img class=\"{'hit' if hit else 'miss'}\" src=\"{image_files[int(row)]}\" "
                   f"alt=\"{html.escape(emb.image_index[row]['path'])}\"><figcaption>{score:.3f}</figcaption></figure>")
    parts.append("</div>")
  parts.append("</body></html>\n")
  with open(path, "w") as f:
    f.write("\n".join(parts))


def plot_grid(emb: exports.Embeddings, found: dict[str, np.ndarray], images: dict[int, np.ndarray], path: str) -> None:
  """report.png: a row per query, its caption then its top-k images with match borders and scores."""
  n, k = found["rows"].shape
  fig = Figure(figsize=figure_size(n, k))
  axes = fig.subplots(n, k + 1, squeeze=False, gridspec_kw={"width_ratios": [TEXT_WIDTH] + [CELL_WIDTH] * k})
  for q, text_row in enumerate(found["queries"]):
    axes[q, 0].axis("off")
    axes[q, 0].text(0, 0.5, "\n".join(textwrap.wrap(emb.text_index[text_row]["caption"], 38)), va="center",
                    fontsize=8, transform=axes[q, 0].transAxes)
    for j, (score, row, hit) in enumerate(zip(found["scores"][q], found["rows"][q], found["hit"][q]), 1):
      ax = axes[q, j]
      ax.imshow(images[int(row)])
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_edgecolor(COLOURS[bool(hit)])
        spine.set_linewidth(4)
      ax.set_title(f"{score:.3f}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)


def check_sizes(num_queries: int, k: int) -> None:
  """Refuses, before any work, a report too large to look at (or to draw)."""
  if not 1 <= num_queries <= MAX_QUERIES:
    raise errors.ConfigError(f"--num_queries must be from 1 to {MAX_QUERIES}, got {num_queries}")
  if not 1 <= k <= MAX_K:
    raise errors.ConfigError(f"-k must be from 1 to {MAX_K}, got {k}")


def write_report(emb: exports.Embeddings, out_dir: str, num_queries: int = 8, k: int = 5, seed: int = 0) -> dict:
  """Writes report.html, report.png and images/ into `out_dir`, whole or not at all; returns what
  was found (`top_k_of_sample`)."""
  check_sizes(num_queries, k)
  if not emb.text_index:
    raise errors.BadInputError(f"{emb.path} holds no captions (an export of own images): the report samples a "
                               "split's captions; search it with text instead (tools.search, tools.serve)")
  found = top_k_of_sample(emb, num_queries, k, seed)
  images = load_images(emb, found["rows"])

  def write_into(staging: str) -> None:
    os.makedirs(os.path.join(staging, IMAGES_DIR))
    image_files = {}
    for row, image in images.items():
      image_files[row] = f"{IMAGES_DIR}/record-{row:06d}.png"
      Image.fromarray(image).save(os.path.join(staging, image_files[row]))
    write_html(emb, found, image_files, os.path.join(staging, HTML_FILE))
    plot_grid(emb, found, images, os.path.join(staging, PNG_FILE))

  files.make_dirs(out_dir, "--out")
  files.replace_folder_files(out_dir, write_into, {HTML_FILE, PNG_FILE, IMAGES_DIR}, last=HTML_FILE)
  return found
