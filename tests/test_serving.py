"""The search service in-process (Starlette's test client on the real application): it serves only
what was exported, refuses other hosts, needs its token, sets its hardening headers, and answers
every malformed request with a 4xx, never a 500 (fuzzed with hypothesis)."""

import os
import shutil
import urllib.parse

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dgia_jax.common import errors
from dgia_jax.gallery import exports, serving
from tests import helpers

HOST = "http://127.0.0.1"


@pytest.fixture(scope="module")
def own_export(tiny_run, tmp_path_factory):
  folder = tmp_path_factory.mktemp("crops")
  for i in range(5):
    Image.new("RGB", (16 + i, 32), (50 * i, 90, 200 - 40 * i)).save(folder / f"p{i}.png")
  out = str(tmp_path_factory.mktemp("emb_own"))
  exports.export_images(tiny_run, str(folder), out)
  return folder, out


@pytest.fixture(scope="module")
def split_export(exported):
  return exported[1]


@pytest.fixture(scope="module")
def service(split_export):
  return serving.SearchService(split_export, query_batch=4)


@pytest.fixture(scope="module")
def client(service):
  with TestClient(serving.create_app(service), base_url=HOST) as c:
    yield c


def test_every_response_carries_the_hardening_headers_and_head_is_allowed(client):
  for path in ("/", "/api/search?q=a+man&k=2", "/images/0", "/nowhere", "/images/99999"):
    r = client.get(path)
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp
  head = client.head("/")
  assert head.status_code == 200 and head.content == b""
  assert client.head("/images/0").status_code == 200
  assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_the_page_writes_server_text_only_as_text():
  assert "innerHTML" not in serving._SCRIPT and "textContent" in serving._SCRIPT


def test_hosts_outside_the_allow_list_are_refused(client):
  assert client.get("/", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
  assert client.get("/", headers={"host": "attacker.example:8000"}).status_code == 400
  for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
    assert client.get("/", headers={"host": host}).status_code == 200, host


def test_a_token_is_needed_for_every_request_when_set(service):
  with TestClient(serving.create_app(service, token="s3cret"), base_url=HOST) as c:
    assert c.get("/api/search?q=a+man").status_code == 401
    assert c.get("/images/0").status_code == 401
    assert c.get("/api/search?q=a+man", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/search?q=a+man", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.get("/?token=s3cret", follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/images/0").status_code == 200  # the cookie the page set


def test_requests_with_a_body_other_methods_and_long_urls_are_refused(client):
  assert client.post("/api/search?q=a", content=b"x").status_code == 405
  assert client.request("GET", "/api/search?q=a", content=b"x" * 10).status_code == 413
  assert client.get("/api/search?q=" + "a" * 5000).status_code == 414


@pytest.mark.parametrize("query, status, says", [
    ("k=%D9%A3&q=a", 400, "k must be a whole number from 1 to 16"),  # an Arabic-Indic three
    ("k=" + "9" * 4000 + "&q=a", 400, "k must be a whole number"),
    ("k=" + "9" * 5000 + "&q=a", 414, "the URL is longer than 4096 bytes"),
    ("k=%C2%B2&q=a", 400, "k must be a whole number"),  # a superscript two: isdigit() says yes
    ("k=-1&q=a", 400, "k must be a whole number"),
    ("k=0&q=a", 400, "k must be a whole number"),
    ("caption=%D9%A3", 404, "no caption row"),
    ("caption=" + "1" * 4000, 404, "no caption row"),
    ("q=+++", 400, "the query is empty"),
    ("", 400, "give one of q"),
])
def test_malformed_parameters_are_a_4xx_naming_them(client, query, status, says):
  r = client.get("/api/search?" + query)
  assert r.status_code == status and says in r.json()["error"], r.text


_SEGMENTS = st.one_of(st.text(max_size=30), st.integers(-5, 10**30).map(str), st.sampled_from(
    ["0", "15", "16", "٣", "²", "1e3", "0x1", "%2e%2e", "..", "../../etc/passwd", "%00", "/etc/passwd"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segment=_SEGMENTS, k=st.one_of(st.none(), _SEGMENTS), q=st.one_of(st.none(), st.text(max_size=40)),
       caption=st.one_of(st.none(), _SEGMENTS), head=st.booleans())
def test_fuzzed_requests_never_get_a_500_or_a_byte_that_was_not_exported(client, service, segment, k, q, caption,
                                                                         head):
  method = client.head if head else client.get
  r = method("/images/" + urllib.parse.quote(segment, safe=""))
  assert r.status_code in (200, 404, 405, 410) or 400 <= r.status_code < 500, (segment, r.status_code)
  if r.status_code == 200 and r.headers["content-type"].startswith("image/"):  # ("/images/.." is the page)
    assert segment.isascii() and segment.isdigit()
    assert head or r.content == service.images.bytes(int(segment))
  params = {name: value for name, value in (("k", k), ("q", q), ("caption", caption)) if value is not None}
  r = method("/api/search", params=params)
  assert r.status_code < 500, (params, r.status_code, r.text)


def test_a_file_swapped_for_a_link_after_export_is_not_served(own_export, tiny_run, tmp_path):
  folder, out = own_export
  copy_folder, copy_out = tmp_path / "crops", str(tmp_path / "emb")
  shutil.copytree(folder, copy_folder)
  exports.export_images(tiny_run, str(copy_folder), copy_out)
  service = serving.SearchService(copy_out, query_batch=2)
  rows = {r["path"]: r["row"] for r in service.emb.image_index}
  with TestClient(serving.create_app(service), base_url=HOST) as c:
    assert c.get(f"/images/{rows['p0.png']}").content == (copy_folder / "p0.png").read_bytes()
    (copy_folder / "p0.png").unlink()
    os.symlink("/etc/passwd", copy_folder / "p0.png")  # swapped for a link to a file outside
    r = c.get(f"/images/{rows['p0.png']}")
    assert r.status_code == 410 and "image row" in r.json()["error"] and "passwd" not in r.text
    stat = (copy_folder / "p1.png").stat()
    Image.new("RGB", (17, 32), (1, 1, 1)).save(copy_folder / "p1.png")  # other bytes, same name
    os.utime(copy_folder / "p1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = c.get(f"/images/{rows['p1.png']}")
    assert r.status_code == 410 and str(copy_folder) not in r.text  # the row is named, never the path
    (copy_folder / "p2.png").unlink()
    assert c.get(f"/images/{rows['p2.png']}").status_code == 410


def test_an_edited_index_is_refused_before_anything_is_served(own_export, tmp_path):
  _, out = own_export
  copy = str(tmp_path / "emb")
  shutil.copytree(out, copy)
  index = os.path.join(copy, "images.jsonl")
  text = open(index).read().replace('"path": "p0.png"', '"path": "../../../../etc/hostname"')
  with open(index, "w") as f:
    f.write(text)
  with pytest.raises(errors.BadInputError, match="images.jsonl: sha256 differs from the manifest's"):
    serving.SearchService(copy)


def _serve(*args):
  return helpers.run_module("dgia_jax.tools.serve", *args, timeout=120)


def test_serve_refuses_a_port_in_use_and_a_wide_host_without_token_in_one_line(split_export):
  import socket

  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    proc = _serve("--emb", split_export, "--port", str(taken.getsockname()[1]))
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: cannot listen on --host 127.0.0.1 --port") and "Address already in use" in proc.stderr
  assert "serving" not in proc.stdout
  proc = _serve("--emb", split_export, "--host", "0.0.0.0")
  assert proc.returncode == 1 and "error: --host 0.0.0.0 listens beyond this machine: give a secret" in proc.stderr
  proc = _serve("--emb", split_export, "--port", "70000")
  assert proc.returncode == 1 and proc.stderr.strip().startswith("error: flag --port=70000")
