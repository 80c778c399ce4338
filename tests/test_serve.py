"""The search service, really started: `python -m dgia_jax.tools.serve` on 127.0.0.1, queried over
HTTP (httpx), and its page driven by headless Chromium (Debian's chromium + chromium-driver)."""

import concurrent.futures
import http.client
import os
import shutil
import time

import httpx
import numpy as np
import pytest

from dgia_jax.data import datasets
from dgia_jax.gallery import exports, searcher
from dgia_jax.inference import encoding, rebuild
from tests import helpers

pytestmark = pytest.mark.slow  # trains or starts programs

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("emb"))
  exports.export_split(tiny_run, "test", out, shard_rows=10)  # 16 images in two shards
  return tiny_run, out


@pytest.fixture(scope="module")
def server(export):
  """The service on a free port of 127.0.0.1, started for these tests and stopped after them."""
  _, emb = export
  port = helpers.free_port()
  proc = helpers.run_module("dgia_jax.tools.serve", "--emb", emb, "--port", str(port), "--query_batch", "4",
                            background=True)
  base = f"http://127.0.0.1:{port}"
  deadline = time.time() + 240
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the server exited: {proc.stdout.read()[-3000:]}")
    try:
      if httpx.get(base + "/", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.5)
  else:
    proc.kill()
    raise AssertionError("the server did not answer within 240 s")
  yield base
  proc.terminate()
  proc.wait(timeout=30)


def _expected(workdir: str, emb_dir: str, queries: list[str], k: int):
  """What `searcher.exact_search` finds for the queries, embedded by the run as the service embeds them."""
  emb = exports.load(emb_dir)
  run = rebuild.load_trained(workdir)
  feats, _ = encoding.TextEncoder(run, batch=4).embed(queries)
  return searcher.exact_search(feats, emb.images, k)


QUERIES = ["a man in a red coat and black trousers", "a woman carrying a pink bag", "a girl in a blue skirt",
           "a young man with short black hair wearing white sneakers", "a person"]


def test_serve_results_equal_exact_search_also_when_queries_arrive_together(server, export):
  workdir, emb_dir = export
  scores, rows = _expected(workdir, emb_dir, QUERIES, 5)
  with concurrent.futures.ThreadPoolExecutor(len(QUERIES)) as pool:  # arriving together: embedded in batches
    answers = list(pool.map(lambda q: httpx.get(server + "/api/search", params={"q": q, "k": 5}, timeout=60), QUERIES))
  index = exports.load(emb_dir).image_index
  for i, answer in enumerate(answers):
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"] == QUERIES[i] and body["k"] == 5 and body["gallery"] == 16 and not body["truncated"]
    assert [r["row"] for r in body["results"]] == rows[i].tolist()
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores[i], atol=1e-6)
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    for r in body["results"]:
      assert r["image_url"] == f"/images/{r['row']}" and r["path"] == index[r["row"]]["path"]
      assert r["person_id"] == index[r["row"]]["person_id"]


def test_serve_caption_queries_say_which_results_show_that_person(server, export):
  _, emb_dir = export
  texts = exports.load(emb_dir).text_index
  random_caption = httpx.get(server + "/api/captions/random", timeout=30).json()
  assert texts[random_caption["row"]]["caption"] == random_caption["caption"]
  body = httpx.get(server + "/api/search", params={"caption": 3, "k": 16}, timeout=30).json()
  assert body["query"] == texts[3]["caption"] and body["person_id"] == texts[3]["person_id"]
  assert [r["match"] for r in body["results"]] == [r["person_id"] == texts[3]["person_id"] for r in body["results"]]
  assert sum(r["match"] for r in body["results"]) == 2  # the tiny set: two views of each person


def test_serve_a_query_longer_than_the_context_is_cut_and_says_so(server):
  long = " ".join(["a man in a red coat and black trousers"] * 10)
  body = httpx.get(server + "/api/search", params={"q": long, "k": 3}, timeout=30).json()
  assert body["truncated"] and body["tokens"] > body["max_tokens"] == 30 and len(body["results"]) == 3


@pytest.mark.parametrize("path, status, error", [
    ("/api/search?q=&k=3", 400, "the query is empty"),
    ("/api/search?q=%20%20&k=3", 400, "the query is empty"),
    ("/api/search?q=a+man&k=0", 400, "k must be a whole number from 1 to 16, got '0'"),
    ("/api/search?q=a+man&k=-2", 400, "k must be a whole number from 1 to 16, got '-2'"),
    ("/api/search?q=a+man&k=17", 400, "k must be a whole number from 1 to 16, got '17'"),
    ("/api/search?q=a+man&k=ten", 400, "k must be a whole number from 1 to 16, got 'ten'"),
    ("/api/search?k=3", 400, "give one of q (a description) or caption"),
    ("/api/search?caption=999&k=3", 404, "no caption row '999'"),
    ("/images/16", 404, "no image row '16': the export holds 16, addressed 0 to 15"),
    ("/images/-1", 404, "no image row '-1'"),
    ("/images/../../etc/passwd", 404, "no image row '../../etc/passwd'"),
    ("/images/..%2F..%2Fetc%2Fpasswd", 404, "no image row '../../etc/passwd'"),
    ("/images/%2e%2e/%2e%2e/etc/passwd", 404, "no image row '../../etc/passwd'"),
    ("/images/0/../../../etc/passwd", 404, "no image row '0/../../../etc/passwd'"),
    ("/images/%2Fetc%2Fpasswd", 404, "no image row '/etc/passwd'"),
    ("/etc/passwd", 404, "Not Found: /etc/passwd"),
])
def test_serve_bad_input_is_a_4xx_json_error_and_the_service_keeps_serving(server, path, status, error):
  connection = http.client.HTTPConnection(server.split("//")[1], timeout=30)  # sends the path as it is
  connection.request("GET", path)
  answer = connection.getresponse()
  body = answer.read().decode()
  assert answer.status == status and answer.getheader("content-type") == "application/json", body
  assert error in httpx.Response(status, content=body).json()["error"], body
  assert httpx.get(server + "/api/search", params={"q": "a man", "k": 1}, timeout=30).status_code == 200


def test_serve_images_are_the_exported_splits_files(server, export):
  workdir, _ = export
  config = rebuild.load_trained(workdir).config
  _, splits = datasets.load(config.data, ("test",))
  answer = httpx.get(server + "/images/7", timeout=30)
  assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
  assert answer.content == splits["test"].image_bytes(7)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(make test installs them where it can)")
def test_browser_types_a_query_and_sees_the_apis_results(server, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(flag)
  browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    browser.get(server + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys(QUERIES[0])
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .tile")) == 10)
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))
    widths = browser.execute_script("return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
    assert len(widths) == 10 and all(w > 0 for w in widths), widths
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .score")]
    api = httpx.get(server + "/api/search", params={"q": QUERIES[0], "k": 10}, timeout=30).json()
    assert shown == [f"{r['rank']}. {r['score']:.4f}" for r in api["results"]]
    assert "results in" in browser.find_element(By.ID, "status").text and " ms" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "random").click()  # a caption of the export: green and red frames
    framed = "#results .tile.hit, #results .tile.miss"
    WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, framed)) == 10)
    row = browser.execute_script("return captionRow")  # the caption the page asked for
    api = httpx.get(server + "/api/search", params={"caption": row, "k": 10}, timeout=30).json()
    frames = [e.get_attribute("class").split()[-1] for e in browser.find_elements(By.CSS_SELECTOR, framed)]
    assert frames == ["hit" if r["match"] else "miss" for r in api["results"]], (row, frames)
    shot = str(tmp_path / "search_page.png")
    assert browser.save_screenshot(shot)
    with open(shot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DGIA_JAX_SCREENSHOT"):  # where the README's picture comes from
      shutil.copy(shot, os.environ["DGIA_JAX_SCREENSHOT"])
  finally:
    browser.quit()
