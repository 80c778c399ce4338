"""The visual top-k report of an export."""

import os
import re

from PIL import Image

from dgia_jax.gallery import exports, report


def test_report_html_shows_existing_images_and_the_png_has_its_size(exported, tmp_path):
  out = str(tmp_path / "report")
  found = report.write_report(exports.load(exported[0]), out, num_queries=4, k=3)
  assert found["rows"].shape == (4, 3)
  page = open(os.path.join(out, report.HTML_FILE)).read()
  sources = re.findall(r'<img class="(hit|miss)" src="([^"]+)"', page)
  assert len(sources) == 12 and page.count("<div class=\"query\">") == 4
  assert [c == "hit" for c, _ in sources] == found["hit"].ravel().tolist()
  for _, src in sources:
    assert os.path.isfile(os.path.join(out, src)), src
  width, height = report.figure_size(4, 3)
  with Image.open(os.path.join(out, report.PNG_FILE)) as png:
    assert png.size == (round(width * report.DPI), round(height * report.DPI))
