"""translate.py: decoder and generation against transformers, tokenizer against transformers' tokenizer,
the HTTP backend against a fake server on 127.0.0.1, resume after SIGKILL, and bad input."""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sentencepiece
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import translate as T  # noqa: E402
from cli import run_cli  # noqa: E402

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CAPTIONS = [
    "Many planes are parked next to a long runway at the airport.",
    "a large  building is surrounded by green trees and a parking lot .",  # double space, spaced period
    "two tennis courts are next to a white house with a swimming pool",
    "There are 12 storage tanks near the river, 3 of them are white.",
    "  leading spaces and a trailing one ",
    "Muitos aviões estão estacionados ao lado de uma pista.",
    "机场跑道旁停着许多飞机。공항 활주로 옆에 비행기. Несколько самолётов",
    "emoji 🛰️ and tabs\tand\nnewlines",
    "literal ▁ meta symbol and <s> and <|im_end|> inside a caption",
]


# ----- fixtures: a Llama-style SentencePiece model and a tiny Tower-like model folder -----

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster and never stalls when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tokenizer(folder: Path, spm_path: Path, legacy: bool | None = None):
    """tokenizer.model plus the tokenizer.json/tokenizer_config.json transformers writes for it.
    transformers 5 converts tokenizer.model only with protobuf installed; it is not a dependency here,
    so the vocabulary and merges come from transformers' own sentencepiece-based extractor."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_path, folder / "tokenizer.model")
    vocab, _, merges = SentencePieceExtractor(str(spm_path)).extract()
    kwargs = {} if legacy is None else {"legacy": legacy}
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, eos_token="<|im_end|>", **kwargs)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|im_start|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True  # as Tower's tokenizer_config.json says
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def llama_spm(tmp_path_factory):
    """BPE with byte fallback, identity normalisation, digits split, whitespace pieces: Llama's recipe."""
    d = tmp_path_factory.mktemp("llama_spm")
    words = ["Translate the following text from English into {}.\nEnglish: {}\n{}:".format(n, c, n)
             for n in T.LANGS.values() for c in CAPTIONS[:4]]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((CAPTIONS + words) * 5 + ["    indented  by   spaces"] * 20),
        model_prefix=str(d / "tokenizer"), vocab_size=600, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=0.9995, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, llama_spm):
    """A Tower-shaped folder: config.json, sharded safetensors + index, tokenizer files; random weights."""
    d = write_tokenizer(tmp_path_factory.mktemp("tiny_tower"), llama_spm)
    n = sentencepiece.SentencePieceProcessor(model_file=str(llama_spm)).get_piece_size()
    cfg = transformers.LlamaConfig(vocab_size=n + 8, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d


def hf_model(kind: str, folder: Path):
    torch.manual_seed(1)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2, rope_theta=500.0)
    if kind == "llama":  # multi-head, untied, sharded
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=4))
        model.save_pretrained(folder, max_shard_size="100KB")
    else:  # grouped-query attention, tied embeddings, one file
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=True, sliding_window=4096))
        model.save_pretrained(folder)
    return model.eval()


def left_pad(prompts):
    L = max(map(len, prompts))
    ids, mask = torch.zeros(len(prompts), L, dtype=torch.long), torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    return ids, mask


PROMPTS = [[1, 5, 9, 30, 44, 12, 7], [1, 5, 9, 8], [1, 5, 9, 30, 250, 3, 4, 5, 6, 7, 8, 99], [1, 77]]


# ----- model: logits and greedy generation equal transformers' -----

# packed: the CPU default, matrices in oneDNN's layout; not packed: plain F.linear, as on GPUs
@pytest.mark.parametrize("packed", [True, False], ids=["onednn", "dense"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_match_transformers(kind, packed, tmp_path):
    hf = hf_model(kind, tmp_path)
    ours = T.load_model(tmp_path, torch.device("cpu"), pack=packed)
    assert (ours.lm_head.packed is not None) == packed
    assert (ours.layers[0].qkv.weight is None) == packed  # dense copies freed: one copy of the weights
    assert ours.c.n_kv_heads == (4 if kind == "llama" else 2) and ours.c.tie_embeddings == (kind == "mistral")
    ids, mask = left_pad(PROMPTS)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    valid = mask.bool()
    L = ids.shape[1]
    attn = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, pos, attn[:, None], ours.new_cache(len(PROMPTS), L))
        assert (ref - got)[valid].abs().max() < 1e-4
        for b, p in enumerate(PROMPTS):  # padding changes nothing
            causal = torch.ones(len(p), len(p), dtype=torch.bool).tril()
            alone = ours(torch.tensor([p]), torch.arange(len(p))[None], causal[None, None],
                         ours.new_cache(1, len(p)))
            assert (alone[0] - got[b, L - len(p):]).abs().max() < 1e-4


@pytest.mark.parametrize("packed", [True, False], ids=["onednn", "dense"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generation_matches_transformers(kind, packed, tmp_path):
    hf = hf_model(kind, tmp_path)
    ours = T.load_model(tmp_path, torch.device("cpu"), pack=packed)
    ids, mask = left_pad(PROMPTS)
    L = ids.shape[1]
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[:, L:]
    stop = {free[0, 3].item(), free[2, 6].item()}  # tokens the model does emit: rows stop at different steps
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=sorted(stop),
                      pad_token_id=0)[:, L:].tolist()
    expected = []
    for row in ref:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        expected.append(row[:cut])
    assert any(len(e) < 12 for e in expected) and any(len(e) == 12 for e in expected)
    got = T.generate(ours, PROMPTS, 12, stop)
    assert got == expected
    assert [T.generate(ours, [p], 12, stop)[0] for p in PROMPTS] == got  # batch composition changes nothing


def test_repetition_penalty_matches_transformers(tmp_path):
    hf = hf_model("llama", tmp_path)
    ours = T.load_model(tmp_path, torch.device("cpu"))
    prompts = [[1, 5, 9, 30, 44], [1, 6, 6, 31, 45]]  # equal lengths: transformers would penalise pads too
    ref = hf.generate(torch.tensor(prompts), max_new_tokens=10, do_sample=False, repetition_penalty=1.3,
                      eos_token_id=None, pad_token_id=0)[:, 5:].tolist()
    assert T.generate(ours, prompts, 10, {299}, repetition_penalty=1.3) == ref
    assert ref != T.generate(ours, prompts, 10, {299})


def test_config_checks(tmp_path):
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    old_style = T.ModelConfig.from_hf({**base, "rope_theta": 1e6, "rope_scaling": None})
    assert old_style.rope_theta == 1e6 and old_style.n_kv_heads == 2 and old_style.head_dim == 4
    new_style = T.ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                                   "rope_theta": 5e5}})
    assert new_style.rope_theta == 5e5
    with pytest.raises(T.TranslateError, match="rope scaling 'yarn'"):
        T.ModelConfig.from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(T.TranslateError, match="unsupported architecture"):
        T.ModelConfig.from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(T.TranslateError, match="biases"):
        T.ModelConfig.from_hf({**base, "attention_bias": True})
    hf_model("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    ours = T.load_model(tmp_path, torch.device("cpu"))
    with pytest.raises(T.TranslateError, match="sliding window"):  # we attend to everything
        T.generate(ours, [list(range(1, 12))], 8, {2})


def test_local_backend_batches_and_retry(tiny_model):
    backend = T.LocalBackend(tiny_model, "cpu", batch_size=3, max_new_tokens=6)
    items = [(c, lang) for lang in ("pt", "zh") for c in CAPTIONS[:4]]
    plan = backend.plan(list(reversed(items)))
    assert plan == backend.plan(items) and [len(b) for b in plan] == [3, 3, 2]  # fixed by the work list
    lens = [len(backend.tok.prompt(*it)) for b in plan for it in b]
    assert lens == sorted(lens, reverse=True)  # longest first
    first, retry = backend.translate(plan[0], False), backend.translate(plan[0], True)
    assert all(isinstance(r.text, str) and 1 <= r.tokens <= 6 for r in first + retry)
    assert [r.text for r in first] != [r.text for r in retry]  # the retry decodes differently
    assert backend.model_id.startswith("local:tiny_tower") and len(backend.model_id.split("@")[1]) == 8


# ----- tokenizer: ids equal transformers' for the same files -----

def texts_for_parity():
    hf_prompts = [T.chatml(T.user_prompt(c, lang)) for c in CAPTIONS for lang in ("pt", "zh")]
    return hf_prompts + CAPTIONS + ["hello<|im_end|>world <|im_start|> x", "<s>", "", " ", "  two"]


@pytest.mark.parametrize("legacy", [None, False, True])
def test_tokenizer_ids_equal_transformers(legacy, llama_spm, tmp_path):
    folder = write_tokenizer(tmp_path / "tok", llama_spm, legacy)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = T.Tokenizer(folder)
    for text in texts_for_parity():
        assert ours.encode(text) == hf(text).input_ids, text
    ids = hf(T.chatml(T.user_prompt(CAPTIONS[1], "pt"))).input_ids
    assert ids[0] == 1 and hf.convert_ids_to_tokens(ids[1]) == "<|im_start|>"
    # whitespace-only pieces occur, so runs of spaces are covered
    assert sum(hf.convert_ids_to_tokens(ids).count(p) for p in ("▁▁", "▁▁▁")) > 0
    for caption in CAPTIONS:  # the chat template as transformers renders it for Tower's model card
        messages = [{"role": "user", "content": T.user_prompt(caption, "ko")}]
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.prompt(caption, "ko") == hf(rendered).input_ids
        plain = hf(caption, add_special_tokens=False).input_ids
        assert ours.decode(plain + [ours.added["<|im_end|>"]]) == hf.decode(plain, skip_special_tokens=True)


def test_tokenizer_reads_tower_style_files(llama_spm, tmp_path):
    """Tower ships added tokens in tokenizer_config.json (added_tokens_decoder), older folders in
    added_tokens.json; without tokenizer.json the ids must not change."""
    ref = T.Tokenizer(write_tokenizer(tmp_path / "ref", llama_spm))
    for style in ("decoder", "added_tokens_json"):
        folder = write_tokenizer(tmp_path / style, llama_spm)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer.json").unlink()
        if style == "decoder":
            how = dict(special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)
            cfg["added_tokens_decoder"] = {str(i): {"content": s, **how} for s, i in ref.added.items()}
        else:
            (folder / "added_tokens.json").write_text(json.dumps({s: i for s, i in ref.added.items()
                                                                  if s.startswith("<|")}))
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        ours = T.Tokenizer(folder)
        assert ours.stop_ids == ref.stop_ids and ours.bos_id == ref.bos_id == 1
        for text in texts_for_parity():
            assert ours.encode(text) == ref.encode(text)


# ----- HTTP backend against a fake server on 127.0.0.1 -----

class FakeServer:
    """OpenAI-style /v1/chat/completions; `script(n, body)` -> (status, json, delay) for the n-th request."""

    def __init__(self, script):
        self.requests, outer = [], self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload, delay = script(len(outer.requests), body)
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(content, finish="stop", tokens=5):
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"completion_tokens": tokens}}


def fake_translation(body):
    """Answers like a translator would, with planted faults: ends a Chinese request in Latin letters,
    returns nothing for 'empty me', the source for 'copy me'; a retry (repetition penalty) fixes all."""
    user = body["messages"][0]["content"]
    lang = next(code for code, name in T.LANGS.items() if user.startswith(f"Translate the following text "
                                                                          f"from English into {name}."))
    src = user.split("\nEnglish: ", 1)[1].rsplit("\n", 1)[0]
    if "repetition_penalty" not in body:
        if src == "empty me":
            return reply("")
        if src == "copy me":
            return reply(src)
        if lang == "zh" and src.startswith("planes"):
            return reply("planes 飞机")
    return reply({"zh": "飞机", "ko": "비행기", "ru": "самолёт"}.get(lang, f"{lang}:{src[::-1]}"))


@pytest.fixture
def connections(monkeypatch):
    """Every address a socket connects to during the test (proxy variables set to trap any detour)."""
    seen, real = [], socket.create_connection
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:9")
    monkeypatch.setenv("https_proxy", "http://10.255.255.1:9")

    def spy(address, *args, **kwargs):
        seen.append(address[0])
        return real(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


def backend(url, **kw):
    return T.HttpBackend(url, kw.pop("api_model", "tower"), 64, 2, kw.pop("timeout", 5.0),
                         kw.pop("max_retries", 3), backoff=0.01, **kw)


def test_http_request_and_retries(connections):
    # 1: 500, 2: slower than the client timeout, 3: fine
    script = {1: (500, {"error": "overloaded"}, 0), 2: (200, reply("late"), 1.0)}
    server = FakeServer(lambda n, body: script.get(n, (200, reply("Muitos aviões", tokens=7), 0)))
    try:
        client = backend(server.url + "/v1/", timeout=0.3, api_key="sk-test")
        out = client.translate([("Many planes", "pt")], False)
    finally:
        server.close()
    assert out == [T.Result("Muitos aviões", 7, True)]
    assert len(server.requests) == 3
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"] == {"model": "tower", "max_tokens": 64, "temperature": 0.0, "stop": ["<|im_end|>"],
                           "messages": [{"role": "user", "content": "Translate the following text from "
                                         "English into Portuguese.\nEnglish: Many planes\nPortuguese:"}]}
    assert connections and set(connections) == {"127.0.0.1"}


@pytest.mark.parametrize("status,message", [
    (401, "HTTP 401, the server refused"), (403, "HTTP 403"), (400, "HTTP 400"),
    (404, "HTTP 404, wrong --base-url or unknown --api-model 'tower'")])
def test_http_client_errors_are_not_retried(status, message, connections):
    server = FakeServer(lambda n, body: (status, {"error": {"message": "nope"}}, 0))
    try:
        with pytest.raises(T.TranslateError, match=message):
            backend(server.url).translate([("x", "pt")], False)
    finally:
        server.close()
    assert len(server.requests) == 1 and set(connections) == {"127.0.0.1"}


def test_http_gives_up_with_a_clear_message(connections):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(T.TranslateError, match="gave up after 3 attempts.*(Refused|refused)"):
        backend(f"http://127.0.0.1:{port}", max_retries=2).translate([("x", "pt")], False)
    server = FakeServer(lambda n, body: (503, {"error": "down"}, 0))
    try:
        with pytest.raises(T.TranslateError, match="gave up after 2 attempts, last error HTTP 503"):
            backend(server.url, max_retries=1).translate([("x", "pt")], False)
    finally:
        server.close()
    assert set(connections) == {"127.0.0.1"}


# ----- the command, end to end -----

def write_manifest(path: Path, n: int = 6):
    lines = []
    for i in range(n):
        third = {1: "copy me", 2: "empty me"}.get(i, CAPTIONS[(i + 1) % 4])
        caps = [CAPTIONS[i % 4], f"planes {i % 3} near a runway", third]
        lines.append({"id": f"demo/{i:03d}", "image": f"images/{i:03d}.jpg", "split": "train",
                      "dataset": "demo", "captions": {"en": caps, "de": ["kept as is"]}})
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return lines


def test_cli_http_end_to_end_with_quality_report(tmp_path, connections):
    records = write_manifest(tmp_path / "captions.jsonl")
    server = FakeServer(lambda n, body: (200, fake_translation(body), 0))
    out, report = tmp_path / "out.jsonl", tmp_path / "out.jsonl.report.json"
    args = [str(tmp_path / "captions.jsonl"), "--langs", "pt,zh", "--out", str(out), "--backend", "http",
            "--base-url", server.url, "--api-model", "tower", "--concurrency", "3"]
    try:
        first = CliRunner().invoke(T.app, args)
        assert first.exit_code == 0, first.output
        n_first, report1 = len(server.requests), json.loads(report.read_bytes())
        second = CliRunner().invoke(T.app, args + ["--retry-flagged"])
        assert second.exit_code == 0, second.output
    finally:
        server.close()
    unique = list(dict.fromkeys(c for r in records for c in r["captions"]["en"]))
    # identical captions are translated once per language; the two empty answers ('empty me' in pt and zh)
    # are asked again at once with the retry decoding, which the fake server answers
    assert n_first == 2 * len(unique) + 2
    assert [r["body"].get("repetition_penalty") for r in server.requests[n_first - 2:n_first]] == [1.2, 1.2]
    cache = [json.loads(line) for line in (tmp_path / "out.jsonl.cache.jsonl").read_text().splitlines()]
    assert all(c["out"] for c in cache)  # an empty answer is never kept
    assert len(cache) == 2 * len(unique) - 2 + 2 + 5  # first answers, retries of the empty, of the flagged
    assert "captions/s" in first.output and "wrong script" in first.output  # progress and summary table
    # planted faults: pt copy; zh copy (also wrong script) + 3 'planes ...' in Latin letters
    counts = report1["counts"]
    assert counts["pt"] == {"strings": len(unique), "same_as_source": 1, "wrong_script": 0, "too_long": 0,
                            "truncated": 0}
    assert counts["zh"] == {"strings": len(unique), "same_as_source": 1, "wrong_script": 4, "too_long": 0,
                            "truncated": 0}
    flagged = {(f["lang"], f["src"]) for f in report1["flagged"]}
    assert flagged >= {("pt", "copy me"), ("zh", "planes 0 near a runway")}
    retries = server.requests[n_first:]  # only the 5 flagged strings, with the retry decoding
    assert len(retries) == 5 and all(r["body"]["repetition_penalty"] == T.RETRY_PENALTY for r in retries)
    report2 = json.loads(report.read_bytes())
    assert report2["flagged"] == []
    assert sum(sum(c.values()) for c in report2["counts"].values()) == 2 * len(unique)  # strings only
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for src, got in zip(records, rows):
        assert {k: v for k, v in got.items() if k != "captions"} == \
            {k: v for k, v in src.items() if k != "captions"}
        assert got["captions"]["de"] == ["kept as is"] and list(got["captions"]) == ["en", "de", "pt", "zh"]
        assert got["captions"]["pt"] == [f"pt:{c[::-1]}" for c in src["captions"]["en"]]  # 'empty me' too
        assert got["captions"]["zh"] == ["飞机"] * len(src["captions"]["en"])
    assert set(connections) == {"127.0.0.1"}


def test_quality_flags():
    def f(src, out, lang, finished=True):
        return T.flags(src, {"out": out, "finished": finished}, lang)
    assert f("Airport", "airport", "de") == ["same_as_source"]
    assert f("two planes", "two planes", "zh") == ["same_as_source", "wrong_script"]
    assert f("two planes", "два самолёта", "ru") == [] and f("two planes", "비행기 두 대", "ko") == []
    assert f("two planes", "两架 GPS 飞机", "zh") == []
    assert f("two planes", "deux avions", "zh") == ["wrong_script"]
    assert f("a farm", "uma fazenda " * 5, "pt") == ["too_long"]
    assert f("a farm", "uma faz", "pt", finished=False) == ["truncated"]


def test_resume_after_sigkill_is_byte_identical(tiny_model, tmp_path):
    records = write_manifest(tmp_path / "captions.jsonl", n=30)
    for i, r in enumerate(records):  # more distinct captions: a longer run to kill
        r["captions"]["en"].append(f"{i} white storage tanks beside {i % 7} roads")
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: same float results

    def args(name):
        return [str(ROOT / "translate.py"), str(tmp_path / "captions.jsonl"), "--langs", "pt,zh,ko",
                "--model", str(tiny_model), "--out", str(tmp_path / f"{name}.jsonl"), "--batch-size", "2",
                "--max-new-tokens", "40", "--device", "cpu"]

    def run(name):
        return subprocess.run([sys.executable, *args(name)], capture_output=True, text=True, env=env,
                              timeout=120)

    full = run("full")
    assert full.returncode == 0, full.stderr
    full_out = (tmp_path / "full.jsonl").read_bytes()
    full_cache = (tmp_path / "full.jsonl.cache.jsonl").read_bytes()
    n_lines = full_cache.count(b"\n")
    keys = [(r["src"], r["lang"]) for r in map(json.loads, full_cache.decode().splitlines())]
    assert len(keys) == len(set(keys)) == 3 * len({c for r in records for c in r["captions"]["en"]})
    # the same run, SIGKILLed once a few batches are in the cache
    cache = tmp_path / "killed.jsonl.cache.jsonl"
    proc = subprocess.Popen([sys.executable, *args("killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not cache.is_file() or cache.read_bytes().count(b"\n") < 6):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = cache.read_bytes()
    assert 6 <= done.count(b"\n") < n_lines - 10, "not killed midway"
    assert full_cache.startswith(done)  # the same batches in the same order
    assert not (tmp_path / "killed.jsonl").exists()  # the output only ever appears complete
    # as if the kill had come in the middle of writing the last line
    cache.write_bytes(done[:-25])
    resumed = run("killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped a truncated last line" in resumed.stderr
    assert (tmp_path / "killed.jsonl").read_bytes() == full_out
    assert cache.read_bytes() == full_cache  # nothing lost, nothing twice, same order


# ----- bad input: one clear message, exit code 1, no traceback -----

@pytest.fixture
def bad_inputs(tiny_model, tmp_path):
    write_manifest(tmp_path / "ok.jsonl", n=2)
    return tmp_path


def cli(*args, code: int = 1) -> str:
    """translate.py's command line as the script runs it (rsmclip.run_cli) -> what it printed to stderr."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
        run_cli(T.app, [str(a) for a in args])
    assert exit_.value.code == code and "Traceback" not in err.getvalue(), err.getvalue()
    return " ".join(err.getvalue().split())


def invoke(folder, *args, manifest="ok.jsonl", model=None):
    model_args = ["--model", str(model)] if model else []
    return cli(folder / manifest, "--out", folder / "out.jsonl", "--device", "cpu", *model_args, *args)


def copy_model(src: Path, dst: Path, drop=(), edit_config=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(edit_config(cfg)))
    return dst


def test_bad_language_and_manifest(bad_inputs, tiny_model):
    d = bad_inputs

    def message(manifest, *args):
        return invoke(d, "--langs", "pt", *args, manifest=manifest, model=tiny_model)
    assert "unknown language xx" in invoke(d, "--langs", "pt,xx", model=tiny_model)
    assert "unknown language en" in invoke(d, "--langs", "en", model=tiny_model)
    ok = '{"id": "a", "image": "a.jpg", "split": "train", "captions": {"en": ["x"]}}\n'
    (d / "no_en.jsonl").write_text(ok + ok.replace('"a"', '"b"').replace('"en"', '"pt"'))
    assert "no_en.jsonl: record 'b' has no English captions" in message("no_en.jsonl")
    (d / "no_dict.jsonl").write_text(ok + ok.replace('"a"', '"b"') + ok.replace('{"en": ["x"]}', '["x"]'))
    assert 'no_dict.jsonl, line 3: captions: ["x"] is not an object' in message("no_dict.jsonl")
    (d / "blank.jsonl").write_text(ok + "\n" + ok)  # the one reader skips blank lines, as training does
    assert "blank.jsonl: duplicated ids a" in message("blank.jsonl")
    (d / "broken.jsonl").write_text(ok + '{"id": "c", "captions": {"en": ["z"]}\n')
    assert "broken.jsonl, line 2: not valid JSON" in message("broken.jsonl")
    assert "missing.jsonl: no such file" in message("missing.jsonl")
    assert "--model DIR is needed" in invoke(d, "--langs", "pt")
    assert "--base-url and --api-model are needed" in invoke(d, "--langs", "pt", "--backend", "http")


def test_bad_model_folders(bad_inputs, tiny_model):
    d = bad_inputs
    no_shards = copy_model(tiny_model, d / "no_shards", drop=("*.safetensors", "*.index.json"))
    assert "no model.safetensors or model.safetensors.index.json" in invoke(d, "--langs", "pt",
                                                                            model=no_shards)
    lost = copy_model(tiny_model, d / "lost_shard", drop=("model-00002-*",))
    assert "shard model-00002-of-" in invoke(d, "--langs", "pt", model=lost)
    gpt2 = copy_model(tiny_model, d / "gpt2",
                      edit_config=lambda c: {**c, "architectures": ["GPT2LMHeadModel"]})
    assert "unsupported architecture ['GPT2LMHeadModel']" in invoke(d, "--langs", "pt", model=gpt2)
    deeper = copy_model(tiny_model, d / "deeper", edit_config=lambda c: {**c, "num_hidden_layers": 3})
    assert "missing ['model.layers.2." in invoke(d, "--langs", "pt", model=deeper)
    no_spm = copy_model(tiny_model, d / "no_spm", drop=("tokenizer.model",))
    assert "no tokenizer.model" in invoke(d, "--langs", "pt", model=no_spm)
    no_chat = copy_model(tiny_model, d / "no_chat", drop=("tokenizer.json", "tokenizer_config.json"))
    assert "tokenizer has no <|im_start|> token" in invoke(d, "--langs", "pt", model=no_chat)
    no_config = copy_model(tiny_model, d / "no_config", drop=("config.json",))
    assert "no config.json" in invoke(d, "--langs", "pt", model=no_config)


def test_config_numbers_are_checked_before_anything_is_allocated(tmp_path, monkeypatch):
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    for key, value, message in [
            ("vocab_size", 4e9, "vocab_size is 4000000000.0, expected a whole number from 1 to 1,048,576"),
            ("hidden_size", -8, "hidden_size is -8"), ("num_attention_heads", 0, "num_attention_heads is 0"),
            ("num_hidden_layers", 10**6, "num_hidden_layers is 1000000"),
            ("head_dim", "4", "head_dim is '4'"),
            ("num_key_value_heads", 3, r"\(2\) must be a multiple of num_key_value_heads \(3\)"),
            ("rms_norm_eps", float("nan"), "rms_norm_eps is nan"),
            ("rope_theta", -1.0, "rope_theta is -1.0")]:
        with pytest.raises(T.TranslateError, match=message):
            T.ModelConfig.from_hf({**base, key: value})
    # numbers in range that do not describe the weights: refused from the safetensors headers alone
    hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1 << 20}))
    monkeypatch.setattr(T, "from_tensors", lambda *a, **k: pytest.fail("allocated before the shapes checks"))
    with pytest.raises(T.TranslateError, match=r"do not match config.json: model.embed_tokens.weight "
                                               r"\(300, 64\) \(config.json implies \(1048576, 64\)\)"):
        T.load_model(tmp_path, torch.device("cpu"))


def test_non_finite_logits_are_an_error(tmp_path):
    hf_model("llama", tmp_path)
    ours = T.load_model(tmp_path, torch.device("cpu"), pack=False)
    with torch.no_grad():
        ours.norm.weight[0] = float("nan")  # what decoded as '⁇ ⁇' and counted as a translation
    with pytest.raises(T.TranslateError, match="logits are not finite"):
        T.generate(ours, PROMPTS, 4, {299})


def http_args(folder: Path, url: str, *extra):
    return [folder / "captions.jsonl", "--out", folder / "out.jsonl", "--backend", "http", "--base-url", url,
            "--api-model", "tower", "--max-retries", "0", *extra]


def test_empty_answers_are_retried_reported_and_never_kept(tmp_path, connections):
    write_manifest(tmp_path / "captions.jsonl", n=3)  # 8 unique captions, one of them 'empty me'
    state = {"null": True}

    def script(n, body):  # `content: null` for 'empty me', with either decoding, until the server recovers
        if state["null"] and "\nEnglish: empty me\n" in body["messages"][0]["content"]:
            return 200, reply(None), 0
        return 200, fake_translation(body), 0
    server = FakeServer(script)
    try:
        message = cli(*http_args(tmp_path, server.url, "--langs", "pt,zh"))
        assert ("2 of 16 strings got only empty answers, from the retry decoding too: pt 'empty me', "
                "zh 'empty me'. Nothing was written") in message
        assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.report.json").exists()
        cache = [json.loads(line) for line in (tmp_path / "out.jsonl.cache.jsonl").read_text().splitlines()]
        assert len(cache) == 14 and all(c["out"] for c in cache)
        n = len(server.requests)
        state["null"] = False  # the same command asks only for what is missing, and finishes
        cli(*http_args(tmp_path, server.url, "--langs", "pt,zh"), code=0)
    finally:
        server.close()
    assert len(server.requests) == n + 4  # 'empty me' x 2 languages x (first decoding: "", retry: text)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[2]["captions"]["pt"][2] == "pt:em ytpme" and rows[2]["captions"]["zh"][2] == "飞机"
    assert set(connections) == {"127.0.0.1"}


def test_cache_lines_that_hold_no_translation_are_skipped_and_redone(tmp_path, connections):
    write_manifest(tmp_path / "captions.jsonl", n=1)
    good = {"model": "http:tower", "lang": "pt", "attempt": 0, "src": CAPTIONS[0], "out": "já traduzido",
            "tokens": 3, "finished": True}
    lines = [json.dumps(good).encode(), b'{"model": "http:tower", "out": "\xff\xfe not UTF-8"}',
             json.dumps({**good, "src": CAPTIONS[1], "out": 5}).encode(),
             json.dumps({**good, "src": "planes 0 near a runway", "out": ""}).encode()]  # an older version's
    (tmp_path / "out.jsonl.cache.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    server = FakeServer(lambda n, body: (200, fake_translation(body), 0))
    try:
        message = cli(*http_args(tmp_path, server.url, "--langs", "pt"), code=0)
    finally:
        server.close()
    assert ("cache: skipped 3 lines that hold no translation (corrupt, or an empty answer): line 2, 3, 4; "
            "their strings are translated again") in message
    assert len(server.requests) == 2  # the good line is used
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["captions"]["pt"] == ["já traduzido", "pt:yawnur a raen 0 senalp", f"pt:{CAPTIONS[1][::-1]}"]


def test_existing_translations_are_kept_unless_overwrite(tmp_path, connections):
    records = write_manifest(tmp_path / "captions.jsonl", n=2)  # each record has "de": ["kept as is"]
    server = FakeServer(lambda n, body: (200, fake_translation(body), 0))
    try:
        message = cli(*http_args(tmp_path, server.url, "--langs", "de,pt"), code=0)
        assert "de: kept the existing captions of 2 records (--overwrite: translate anew)" in message
        assert all("into Portuguese" in r["body"]["messages"][0]["content"] for r in server.requests)
        rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [r["captions"]["de"] for r in rows] == [["kept as is"]] * 2
        assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["kept"] == {"de": 2, "pt": 0}
        cli(*http_args(tmp_path, server.url, "--langs", "de", "--overwrite"), code=0)
    finally:
        server.close()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["captions"]["de"] for r in rows] == [[c if c == "copy me" else f"de:{c[::-1]}"  # a planted copy
                                                    for c in r["captions"]["en"]] for r in records]
    records[1]["captions"]["pt"] = ["", "x", "y"]  # e.g. the output of an older version
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ("1 existing translations are empty or not lists of text: 'demo/001' pt. Fix or remove them, or "
            "pass --overwrite") in cli(*http_args(tmp_path, "http://127.0.0.1:9", "--langs", "pt"))


def test_outputs_never_overwrite_the_manifest_or_each_other(tmp_path):
    write_manifest(tmp_path / "captions.jsonl", n=1)
    before = (tmp_path / "captions.jsonl").read_bytes()
    manifest = tmp_path / "captions.jsonl"

    def refused(*extra):  # every case stops before a request: nobody listens on port 9
        return cli(*http_args(tmp_path, "http://127.0.0.1:9", "--langs", "pt", *extra))
    assert f"--cache {manifest} is the input manifest" in refused("--cache", manifest)
    assert f"--report {manifest} is the input manifest" in refused("--report", manifest)
    assert "is also the output" in refused("--cache", tmp_path / "out.jsonl")
    assert "--out" in refused("--out", tmp_path) and "is a folder" in refused("--out", tmp_path)
    assert manifest.read_bytes() == before
    manifest.write_text(json.dumps({"id": "x", "image": "x.jpg", "split": "train",
                                    "captions": {"en": ["a", " ", ""]}}) + "\n")
    assert "2 English captions are empty: 'x' #1, 'x' #2. None was sent for translation" in refused()
    assert list(tmp_path.iterdir()) == [tmp_path / "captions.jsonl"]


def test_disk_full_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path, connections, monkeypatch):
    write_manifest(tmp_path / "captions.jsonl", n=1)
    (tmp_path / "out.jsonl").write_text("an earlier run's output\n")
    server = FakeServer(lambda n, body: (200, fake_translation(body), 0))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)  # atomic_write flushes the finished temporary file to disk
    try:
        said = cli(*http_args(tmp_path, server.url, "--langs", "pt"))
        assert "out.jsonl: cannot write it (No space left on device; " in said
    finally:
        server.close()
    assert (tmp_path / "out.jsonl").read_text() == "an earlier run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "out.jsonl",
                                                          "out.jsonl.cache.jsonl"]  # no temporary file
    assert len((tmp_path / "out.jsonl.cache.jsonl").read_text().splitlines()) == 3  # every translation kept
