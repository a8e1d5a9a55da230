"""`python rsmclip_cli.py ...` end to end on the tiny preset, and `download` against a local hub on
127.0.0.1."""
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli
import files
import rsmclip
import rsmclip_cli
from bench.openclip_oracle import fill_with_noise
from search import index

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "rsmclip_cli.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250", **(env or {})})


@pytest.fixture
def run_here(capsys, monkeypatch):
    """`run` in this process: the same command and terminal width, without a Python start per call."""
    monkeypatch.setenv("COLUMNS", "250")

    def run_in_process(*args) -> subprocess.CompletedProcess:
        with pytest.raises(SystemExit) as done:
            cli.run_cli(rsmclip_cli.app, [*map(str, args)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, done.value.code, out.out, out.err)

    return run_in_process


@pytest.fixture
def tiny_weights(tmp_path, spm_model):
    """A noise-filled tiny model saved in our format with its tokenizer beside it."""
    folder = tmp_path / "weights"
    folder.mkdir()
    rsmclip.save(fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS["tiny"]), seed=1), folder / "tiny.safetensors")
    shutil.copy(spm_model, folder / "spm.model")
    return folder / "tiny.safetensors"


def write_images(folder: Path, n: int, start: int = 0):
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        a = np.random.default_rng(i).integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / (f"img{i:02d}.tif" if i % 2 else f"img{i:02d}.png"))


def test_info():
    result = run("info", "--preset", "xlmr-b32")
    assert result.returncode == 0, result.stderr
    assert "total 366,121,473" in result.stdout and '"vocab_size": 250002' in result.stdout


def test_convert_round_trip(tiny_weights, tmp_path, run_here):
    run = run_here
    assert run("convert", tiny_weights, tmp_path / "oc.safetensors", "--to-openclip").returncode == 0
    with safe_open(str(tmp_path / "oc.safetensors"), "pt") as f:
        assert "visual.conv1.weight" in f.keys() and f.metadata()["format"] == "open_clip"
    result = run("convert", tmp_path / "oc.safetensors", tmp_path / "back.safetensors")
    assert result.returncode == 0, result.stderr
    _, a = rsmclip.read_weights(tiny_weights)
    _, b = rsmclip.read_weights(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_records_the_tokenizer_and_keeps_the_record(tiny_weights, tmp_path):
    """--tokenizer puts the file's SHA-256 in the weights; a later convert without it keeps it."""
    spm = tiny_weights.parent / rsmclip.PRESETS["tiny"].tokenizer
    assert rsmclip.tokenizer_sha(tiny_weights) is None
    result = run("convert", tiny_weights, tmp_path / "a.safetensors", "--tokenizer", spm)
    assert result.returncode == 0, result.stderr
    assert rsmclip.tokenizer_sha(tmp_path / "a.safetensors") == files.file_sha256(spm)
    result = run("convert", tmp_path / "a.safetensors", tmp_path / "oc.safetensors", "--to-openclip")
    assert result.returncode == 0, result.stderr
    assert rsmclip.tokenizer_sha(tmp_path / "oc.safetensors") == files.file_sha256(spm)


def test_embed_classify_and_bad_input(tiny_weights, tmp_path, run_here):
    run = run_here
    images = tmp_path / "images"
    write_images(images, 4)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not an image")
    (tmp_path / "texts.txt").write_text("many planes at an airport\nmuitos aviões\n\n机场里的飞机\n",
                                        encoding="utf-8")
    result = run("embed", "--model", tiny_weights, "--images", images, "--texts", tmp_path / "texts.txt",
                 "--out", tmp_path / "emb.safetensors", "--precision", "fp32")  # as load()'s default
    assert result.returncode == 0, result.stderr
    assert "skipped:" in result.stderr and "corrupt.jpg" in result.stderr
    with safe_open(str(tmp_path / "emb.safetensors"), "pt") as f:
        image_emb, text_emb = f.get_tensor("image_embeddings"), f.get_tensor("text_embeddings")
        assert len(json.loads(f.metadata()["images"])) == 4 and len(json.loads(f.metadata()["texts"])) == 3
    assert image_emb.shape == (4, 64) and text_emb.shape == (3, 64)
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(4), atol=1e-5)
    model, pp, tok = rsmclip.load(tiny_weights)
    with torch.no_grad():
        direct = model.encode_image(pp(images / "img00.png")[None], normalize=True)
    assert torch.allclose(image_emb[0], direct[0], atol=1e-6)

    result = run("classify", images / "img00.png", images / "img01.tif", "--model", tiny_weights,
                 "--labels", "floresta, rio, aeroporto", "--lang", "pt")
    assert result.returncode == 0, result.stderr
    assert "floresta" in result.stdout and "img01.tif" in result.stdout and "prediction" in result.stdout

    for args, message in [
        (("classify", images, "--model", tmp_path / "nope.safetensors", "--labels", "a,b"),
         "no such weights file"),
        (("classify", images, "--model", tiny_weights, "--labels", "a,b", "--lang", "xx"),
         "unknown language 'xx'"),
        (("embed", "--model", tiny_weights, "--out", tmp_path / "e.safetensors"), "nothing to embed"),
        (("embed", "--model", images, "--images", images, "--out", tmp_path / "e.safetensors"),
         "is a directory"),
        (("search", tmp_path / "nowhere", "x", "--model", tiny_weights), "no such file or folder to search"),
    ]:
        result = run(*args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, args


def test_search_index_is_updated_not_rebuilt(tiny_weights, tmp_path, run_here):
    run = run_here
    images = tmp_path / "images"
    write_images(images, 5)
    FP32 = ("--precision", "fp32")  # load()'s default, compared below; every search here at one precision
    result = run("search", images, "aviões no aeroporto", "--model", tiny_weights, "--top-k", "3",
                 "--out", tmp_path / "hits.json", *FP32)
    assert result.returncode == 0, result.stderr
    assert "5 images (5 added, 0 removed" in result.stdout
    hits = json.loads((tmp_path / "hits.json").read_text())["aviões no aeroporto"]
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    model, pp, tok = rsmclip.load(tiny_weights)
    with torch.no_grad():
        q = model.encode_text(tok(["aviões no aeroporto"]), normalize=True)[0]
        scores = {str(p): float(model.encode_image(pp(p)[None], normalize=True)[0] @ q)
                  for p in images.iterdir() if not p.name.startswith(".")}
    assert (hits[0]["path"] == max(scores, key=scores.get)
            and abs(hits[0]["score"] - max(scores.values())) < 1e-4)

    write_images(images, 1, start=5)
    (images / "img00.png").unlink()
    result = run("search", images, "forest", "campo verde", "--model", tiny_weights, *FP32)
    assert result.returncode == 0, result.stderr
    assert "5 images (1 added, 1 removed or changed, 0 unreadable skipped)" in result.stdout
    assert "campo verde" in result.stdout
    result = run("search", images, "forest", "--model", tiny_weights, *FP32)
    assert "5 images (0 added, 0 removed" in result.stdout
    # other weights get an index of their own, and the first one is kept
    other = tiny_weights.with_name("other.safetensors")
    rsmclip.save(fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS["tiny"]), seed=2), other)
    assert "5 images (5 added" in run("search", images, "forest", "--model", other, *FP32).stdout
    assert "5 images (0 added" in run("search", images, "forest", "--model", tiny_weights, *FP32).stdout
    # one --index file given for two weights is rebuilt, never trusted
    shared = tmp_path / "shared-index.safetensors"
    result = run("search", images, "forest", "--model", tiny_weights, "--index", shared, *FP32)
    assert "5 added" in result.stdout
    result = run("search", images, "forest", "--model", other, "--index", shared, *FP32)
    assert "built with other weights, rebuilding" in result.stderr and "5 added" in result.stdout


def test_the_index_lives_in_the_user_cache_and_a_read_only_folder_can_be_searched(tiny_weights, tmp_path,
                                                                                  user_cache):
    images = tmp_path / "images"
    write_images(images, 3)
    before = sorted(images.iterdir())
    images.chmod(0o555)  # (root ignores the mode; the listing below holds for everyone)
    try:
        result = run("search", images, "forest", "--model", tiny_weights)
    finally:
        images.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert sorted(images.iterdir()) == before  # nothing written into the searched folder
    [index] = (user_cache / "index").iterdir()
    assert f"index {index}: 3 images (3 added" in result.stdout
    assert json.loads((index / "index.json").read_text())["root"] == str(images.resolve())


def test_search_and_classify_pages_hold_one_embedded_image_per_hit(tiny_weights, tmp_path):
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sections, self.text = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "section":
                self.sections.append([])
            if tag == "img":
                self.sections[-1].append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    images = tmp_path / "images"
    write_images(images, 4)
    queries = ["forest", "港口里的船"]
    result = run("search", images, *queries, "--model", tiny_weights, "--top-k", "3",
                 "--out", tmp_path / "hits.json", "--html", tmp_path / "hits.html")
    assert result.returncode == 0, result.stderr
    assert all(f"wrote {tmp_path / name}" in result.stdout for name in ("hits.json", "hits.html"))
    hits = json.loads((tmp_path / "hits.json").read_text())
    page = Page()
    page.feed((tmp_path / "hits.html").read_text(encoding="utf-8"))
    text = "".join(page.text)
    assert len(page.sections) == 2 and all(len(s) == 3 for s in page.sections)
    for query, section in zip(queries, page.sections):
        assert query in text
        for rank, (hit, src) in enumerate(zip(hits[query], section), 1):
            assert f"#{rank}  score {hit['score']:.4f}" in text and hit["path"] in text
            assert src.startswith("data:image/jpeg;base64,")
            thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
            original = Image.open(images / hit["path"])
            assert thumb.size == original.size  # smaller than the thumbnail size: kept as it is

    result = run("classify", images, "--labels", "forest,river,airport", "--model", tiny_weights,
                 "--out", tmp_path / "c.json", "--html", tmp_path / "c.html")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'c.json'}" in result.stdout and f"wrote {tmp_path / 'c.html'}" in result.stdout
    classes = json.loads((tmp_path / "c.json").read_text())
    assert classes["labels"] == ["forest", "river", "airport"] and len(classes["images"]) == 4
    for row in classes["images"]:
        probs = row["probabilities"]
        assert abs(sum(probs.values()) - 1) < 1e-3 and row["prediction"] == max(probs, key=probs.get)
    page = Page()
    page.feed((tmp_path / "c.html").read_text(encoding="utf-8"))
    assert [len(s) for s in page.sections] == [4]
    text = "".join(page.text)
    assert all(f"{r['prediction']} {r['probability']:.3f}" in text and r["path"] in text
               for r in classes["images"])

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless Chromium here (Debian: apt install chromium) for the screenshot check")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,700", (tmp_path / "hits.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (700, 1000, 3)
    # the thumbnails were drawn: the random test images give many colours, a page of text gives few
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5000


def test_warnings_for_unreadable_queries_and_the_toy_model(tiny_weights, tmp_path, demo_manifest, run_here):
    run = run_here
    images = tmp_path / "images"
    write_images(images, 2)
    result = run("search", images, "港口里的船 ᚠᚢᚦᚨ", "many planes", "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert "query '港口里的船 ᚠᚢᚦᚨ'" in result.stderr and "unknown to the tokenizer" in result.stderr
    assert "'many planes'" not in result.stderr
    assert "is the tiny demo model, a toy" in result.stderr
    result = run("classify", images, "--labels", "forest,ᚠᚢᚦᚨ", "--model", tiny_weights)
    assert "label 'ᚠᚢᚦᚨ'" in result.stderr and "label 'forest'" not in result.stderr
    demo_images = sorted((demo_manifest.parent / "images").iterdir())[:2]
    result = run("classify", *demo_images, "--labels", "forest,river", "--model", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert "toy" not in result.stderr  # the demo model on the demo's own images is what it is for


def test_the_toy_warning_knows_the_demo_folder_and_the_architecture(demo_manifest, tmp_path, capsys):
    """eval.py passes the manifest or class folder: inside the demo's folder no warning, elsewhere one."""
    tiny = rsmclip.PRESETS["tiny"]
    cli.warn_if_toy(tiny, "w.safetensors", [demo_manifest, demo_manifest.parent / "images"])
    assert capsys.readouterr().err == ""
    cli.warn_if_toy(tiny, "w.safetensors", [demo_manifest, tmp_path])
    assert "w.safetensors is the tiny demo model, a toy" in capsys.readouterr().err
    cli.warn_if_toy(rsmclip.PRESETS["xlmr-b32"], "w.safetensors", [tmp_path])
    assert capsys.readouterr().err == ""


def test_known_weight_names_resolve_in_the_user_cache(tiny_weights, user_cache, tmp_path):
    with pytest.raises(rsmclip.WeightsError, match="rs-m-clip: not downloaded yet; `rsmclip download rs-m"):
        rsmclip.load("rs-m-clip")
    cached = user_cache / "weights"
    cached.mkdir()
    shutil.copy(tiny_weights, cached / "rs-m-clip.safetensors")
    shutil.copy(tiny_weights.with_name("spm.model"), cached / "spm.model")
    model, _, tokenizer = rsmclip.load("rs-m-clip")
    assert tokenizer.path == cached / "spm.model"
    expected, _, _ = rsmclip.load(tiny_weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    images = tmp_path / "images"
    write_images(images, 2)
    result = run("search", images, "forest", "--model", "rs-m-clip")
    assert result.returncode == 0, result.stderr


def test_embed_writes_the_format_its_suffix_names(tiny_weights, tmp_path, run_here):
    run = run_here
    images = tmp_path / "images"
    write_images(images, 3)
    (tmp_path / "t.txt").write_text("forest\nrio\n", encoding="utf-8")
    args = ("--model", tiny_weights, "--images", images, "--texts", tmp_path / "t.txt")
    assert run("embed", *args, "--out", tmp_path / "e.safetensors").returncode == 0
    result = run("embed", *args, "--out", tmp_path / "e.npz")
    assert result.returncode == 0 and f"wrote {tmp_path / 'e.npz'}" in result.stdout, result.stderr
    npz = np.load(tmp_path / "e.npz")
    with safe_open(str(tmp_path / "e.safetensors"), "np") as f:
        assert np.array_equal(npz["image_embeddings"], f.get_tensor("image_embeddings"))
        assert np.array_equal(npz["text_embeddings"], f.get_tensor("text_embeddings"))
        assert list(npz["images"]) == json.loads(f.metadata()["images"])
    assert list(npz["texts"]) == ["forest", "rio"]


def test_info_json_is_pure_json():
    result = run("info", "--preset", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"]["total"] == 1_431_681 and info["config"]["embed_dim"] == 64


# ----------------------------------------------------------------------------- download from a local hub


class FakeHub(BaseHTTPRequestHandler):
    """The hub's protocol: HEAD/GET on /<repo>/resolve/main/<file>; an LFS file answers 302 to a CDN with
    its sha256 in X-Linked-Etag and its size in X-Linked-Size; a small git file answers 200 with a
    git-blob ETag. The CDN honours Range. Knobs: drop the connection once mid-file, lie about sha256."""
    files: dict = {}
    lfs: set = set()
    announced_sha: dict = {}
    drop_once_after: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def _route(self):
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        if self.path.startswith("/cdn/"):
            return "cdn", self.path[len("/cdn/"):]
        repo_file = self.path.lstrip("/").replace("/resolve/main/", "/", 1)
        return ("file", repo_file) if repo_file in self.files else ("missing", repo_file)

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _answer(self, head):
        kind, name = self._route()
        if kind == "missing":
            self.send_response(404)
            self.end_headers()
            return
        data = self.files[name]
        if kind == "file" and name in self.lfs:
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            self.send_header("X-Linked-Etag",
                             f'"{self.announced_sha.get(name, hashlib.sha256(data).hexdigest())}"')
            self.send_header("X-Linked-Size", self.linked_size.get(name, str(len(data))))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')  # a git blob id, not a sha256
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        time.sleep(self.stall_once.pop(name, 0))  # headers sent, then nothing: a stalled connection
        cut = self.drop_once_after.pop(name, None)
        self.wfile.write(data[start:cut] if cut else data[start:])
        if cut:
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def hub(tmp_path, spm_model):
    model = fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS["tiny"]), seed=3)
    sd = rsmclip.to_openclip_state_dict(model.state_dict(), model.config)
    sd["text.transformer.embeddings.position_ids"] = torch.arange(514)[None]  # as in the public file
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    FakeHub.files = {"joaodaniel/RS-M-CLIP/open_clip_pytorch_model.bin":
                     (tmp_path / "open_clip_pytorch_model.bin").read_bytes(),
                     "FacebookAI/xlm-roberta-base/sentencepiece.bpe.model": Path(spm_model).read_bytes()}
    FakeHub.lfs = {"joaodaniel/RS-M-CLIP/open_clip_pytorch_model.bin"}
    FakeHub.announced_sha, FakeHub.drop_once_after, FakeHub.requests = {}, {}, []
    FakeHub.linked_size, FakeHub.stall_once = {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model
    server.shutdown()


def test_download_converts_checks_and_resumes(hub, tmp_path):
    endpoint, model = hub
    name = "joaodaniel/RS-M-CLIP/open_clip_pytorch_model.bin"
    FakeHub.drop_once_after[name] = len(FakeHub.files[name]) // 3  # the connection dies a third of the way
    result = run("download", "rs-m-clip", "tokenizer", "--out", tmp_path / "w", "--endpoint", endpoint)
    assert result.returncode == 0, result.stderr
    assert "connection lost" in result.stderr and "size and sha256 check" in result.stdout
    ranges = [r for method, path, r in FakeHub.requests if method == "GET" and path == f"/cdn/{name}"]
    assert ranges == [None, f"bytes={len(FakeHub.files[name]) // 3}-"]
    # safetensors was tried first (404), the pickle was converted, and no raw or partial file is left
    assert (("HEAD", "/joaodaniel/RS-M-CLIP/resolve/main/open_clip_model.safetensors", None)
            in FakeHub.requests)
    assert (sorted(p.name for p in (tmp_path / "w").iterdir())
            == ["rs-m-clip.safetensors", "sentencepiece.bpe.model"])
    loaded, _, tok = rsmclip.load(tmp_path / "w/rs-m-clip.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert run("download", "tokenizer", "--out", tmp_path / "w", "--endpoint", endpoint).stdout.endswith(
        "already present (checked)\n")


def test_download_checks_what_it_got_and_what_is_already_there(hub, tmp_path):
    endpoint, _ = hub
    tok = "FacebookAI/xlm-roberta-base/sentencepiece.bpe.model"
    good = FakeHub.files[tok]
    FakeHub.files[tok] = b"<html><body>502 Bad Gateway</body></html>"  # a proxy's error page, status 200
    result = run("download", "tokenizer", "--out", tmp_path / "w", "--endpoint", endpoint)
    assert result.returncode == 1 and "the server sent no SentencePiece model" in result.stderr
    assert not list((tmp_path / "w").iterdir())
    (tmp_path / "w" / "sentencepiece.bpe.model").write_bytes(b"")  # an empty or foreign file is not "present"
    result = run("download", "tokenizer", "--out", tmp_path / "w", "--endpoint", endpoint)
    assert result.returncode == 1 and "present but not usable (it is empty); delete it" in result.stderr
    (tmp_path / "w" / "sentencepiece.bpe.model").unlink()
    FakeHub.files[tok] = good
    FakeHub.stall_once[tok] = 3
    result = run("download", "tokenizer", "--out", tmp_path / "w", "--endpoint", endpoint, "--timeout", "1")
    assert result.returncode == 0, result.stderr
    assert "1 s without data counts as a stall" in result.stdout and "stalled for 1 s" in result.stderr
    assert (tmp_path / "w" / "sentencepiece.bpe.model").read_bytes() == good
    FakeHub.linked_size["joaodaniel/RS-M-CLIP/open_clip_pytorch_model.bin"] = "abc"
    result = run("download", "rs-m-clip", "--out", tmp_path / "w", "--endpoint", endpoint)
    assert result.returncode == 0, result.stderr
    assert "announced the size 'abc', not a number; no size check" in result.stderr
    result = run("download", "tokenizer", "--out", tmp_path / "x", "--endpoint", "notaurl")
    assert (result.returncode == 1 and "not an http(s) URL" in result.stderr
            and "Traceback" not in result.stderr)


def test_download_resumes_a_killed_run_and_rejects_bad_checksums(hub, tmp_path):
    endpoint, _ = hub
    name = "joaodaniel/RS-M-CLIP/open_clip_pytorch_model.bin"
    data = FakeHub.files[name]
    out = tmp_path / "w"
    out.mkdir()
    # what a killed process leaves: a partial file
    (out / "rs-m-clip.open_clip_pytorch_model.bin.part").write_bytes(data[:1000])
    assert rsmclip_cli.download("rs-m-clip", out, endpoint) == out / "rs-m-clip.safetensors"
    assert [r for m, p, r in FakeHub.requests if m == "GET" and p.startswith("/cdn/")] == ["bytes=1000-"]

    FakeHub.announced_sha[name] = "0" * 64
    result = run("download", "rs-m-clip", "--out", tmp_path / "w2", "--endpoint", endpoint)
    assert result.returncode == 1 and "differs from the announced" in result.stderr
    assert "Traceback" not in result.stderr and list((tmp_path / "w2").iterdir()) == []
    result = run("download", "laion", "--out", tmp_path / "w3", "--endpoint", endpoint)
    assert (result.returncode == 1
            and "none of open_clip_model.safetensors, open_clip_pytorch_model.bin" in result.stderr)


def built_index(weights: Path, tmp_path: Path) -> Path:
    """The index of a folder of two pictures, built by a search (--index tmp/ix)."""
    images = tmp_path / "images"
    write_images(images, 2)
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, ["search", str(images), "x", "--model", str(weights), "--index",
                                      str(tmp_path / "ix"), "--precision", "fp32"])
    return tmp_path / "ix"


def damage(folder: Path, kind: str):
    """A search index damaged in one way: index.json cut, random or empty, of another format, naming a
    missing or short part, a table of another type, of another length, naming an unknown source."""
    manifest = json.loads((folder / "index.json").read_text())
    part = folder / manifest["parts"][0]["name"]
    table = np.load(f"{part}.npy")
    if kind in ("truncated", "random", "empty"):
        text = (folder / "index.json").read_bytes()
        cut = {"truncated": text[:-7], "random": os.urandom(300), "empty": b""}[kind]
        (folder / "index.json").write_bytes(cut)
    elif kind == "another format":
        (folder / "index.json").write_text(json.dumps(manifest | {"format": "rsmclip-index 1"}))
    elif kind == "no sources":
        (folder / "index.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "sources"}))
    elif kind == "part missing":
        Path(f"{part}.f16").unlink()
    elif kind == "embeddings cut short":
        Path(f"{part}.f16").write_bytes(Path(f"{part}.f16").read_bytes()[:-2])
    elif kind == "table of floats":
        np.save(f"{part}.npy", np.zeros(len(table)))
    elif kind == "table a row short":
        np.save(f"{part}.npy", table[:-1])
    elif kind == "unknown source":
        table["source"][0] = 7
        np.save(f"{part}.npy", table)


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "another format", "no sources",
                                  "part missing", "embeddings cut short", "table of floats",
                                  "table a row short", "unknown source"])
def test_a_damaged_search_index_is_rebuilt_with_a_warning(tiny_weights, tmp_path, capsys, kind):
    folder = built_index(tiny_weights, tmp_path)
    fingerprint, tiling = index.index_fingerprint(tiny_weights, "fp32"), index.Tiling(64)
    kept = index.read_index(folder, fingerprint, 64, tiling)
    assert kept.rows == 2 and kept.feats[0].shape == (2, 64)
    assert index.read_index(folder, "other weights", 64, tiling) is None
    assert index.read_index(folder, fingerprint, 64, index.Tiling(32)) is None
    err = capsys.readouterr().err
    assert "built with other weights" in err and "built with another tiling (--tile 64 -> 32)" in err
    damage(folder, kind)
    assert index.read_index(folder, fingerprint, 64, tiling) is None
    assert "damaged search index" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, ["search", str(tmp_path / "images"), "x", "--model", str(tiny_weights),
                                      "--index", str(folder), "--precision", "fp32"])
    assert "2 images (2 added, 0 removed" in capsys.readouterr().out  # rebuilt
    assert index.read_index(folder, fingerprint, 64, tiling).rows == 2


def test_non_finite_embeddings_in_an_index_stop_the_search(tiny_weights, tmp_path, capsys):
    folder = built_index(tiny_weights, tmp_path)
    part = folder / f"{json.loads((folder / 'index.json').read_text())['parts'][0]['name']}.f16"
    part.write_bytes(np.full(128, np.nan, np.float16).tobytes())
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(rsmclip_cli.app, ["search", str(tmp_path / "images"), "x", "--model", str(tiny_weights),
                                      "--index", str(folder), "--precision", "fp32"])
    assert exit_.value.code == 1 and "non-finite embeddings (damaged)" in capsys.readouterr().err


def test_the_weights_fingerprint_sees_an_edit_to_any_tensor(tiny_weights, tmp_path):
    """The search index and the feature cache are keyed by it: a fine-tuned last tensor (visual.proj sits
    at the end of the file) must change it, which a sampled hash missed."""
    tensors = load_file(tiny_weights)
    with safe_open(str(tiny_weights), "pt") as f:
        meta = f.metadata()
    before = rsmclip.weights_fingerprint(tiny_weights)
    for name in ("visual.proj.weight", "logit_scale", "text.tok_embed.weight"):
        edited = {**tensors, name: tensors[name].clone()}
        edited[name].view(-1)[-1] += 1e-3
        save_file(edited, str(tmp_path / "edited.safetensors"), meta)
        assert rsmclip.weights_fingerprint(tmp_path / "edited.safetensors") != before, name


def test_a_full_disk_leaves_the_old_search_results_and_a_clear_message(tiny_weights, tmp_path, monkeypatch,
                                                                       capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (20, 80, 200)).save(images / "a.png")
    hits = tmp_path / "hits.json"
    hits.write_text("old results")

    def full(fd):
        raise OSError(28, "No space left on device")

    search = ["search", str(images), "water", "--model", str(tiny_weights), "--index", str(tmp_path / "i")]
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, search)  # the index is built while the disk has room
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(rsmclip_cli.app, search + ["--out", str(hits)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "hits.json: cannot write it (No space left on device; " in err
    assert "an existing file is unchanged" in err
    assert hits.read_text() == "old results" and not list(tmp_path.glob(".*.tmp"))


def test_a_foreign_tokenizer_is_refused(spm_model):
    xlmr_sized = rsmclip.PRESETS["xlmr-b32"]
    with pytest.raises(rsmclip.RsmclipError, match="has .* ids but the model's vocabulary has 250,002"):
        rsmclip.tokenizer_for(xlmr_sized, spm_model)  # a 400-piece model for XLM-R's vocabulary
    tiny = rsmclip.PRESETS["tiny"]
    assert rsmclip.tokenizer_for(tiny, spm_model).vocab_size <= tiny.text.vocab_size  # fits: the demo's case
