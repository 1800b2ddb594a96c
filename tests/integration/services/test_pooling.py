"""Pooling models served, on both deployments: all-MiniLM-L6-v2 (the packaged embedding
model) against sentence-transformers' own `encode`, and a tiny random cross-encoder against
Hugging Face's logits, through /v1/embeddings, /pooling, /score, /rerank and /classify; bad
input gets a 400 and the server goes on."""

from __future__ import annotations

import base64
import os
import struct

import httpx
import pytest
import torch

from tests.helpers.cluster import start_cluster, stop_cluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir() -> str:
    from tandem.model_prep import packaged_model_dir

    return str(packaged_model_dir("all-MiniLM-L6-v2"))


def serve(model: str, deployment: str, tmp_path_factory):
    """`tandem serve` of a pooling model: one process, or a cluster without decode workers."""
    log = tmp_path_factory.mktemp("pooling") / "server.log"
    flags = ["--colocated"] if deployment == "colocated" else ["--decode-workers", "0"]
    return start_cluster(model, *flags, log_path=log)


@pytest.fixture(scope="module", params=["colocated", "cluster"])
def embedder(request, tmp_path_factory):
    proc, base = serve("all-MiniLM-L6-v2", request.param, tmp_path_factory)
    yield base
    stop_cluster(proc)


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir(), device="cpu")


def sentences(n: int) -> list[str]:
    """Mixed lengths, up to past the model's 256 tokens (cut as sentence-transformers cuts)."""
    gen = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over a lazy dog while rivers of data flow".split()
    out = []
    for i in range(n):
        length = [1, 3, 12, 40, 150, 300][i % 6]
        picks = torch.randint(len(words), (length,), generator=gen).tolist()
        out.append(" ".join(words[j] for j in picks))
    return out


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=120)


def test_embeddings_equal_sentence_transformers(embedder, sentence_transformer):
    texts = sentences(64)
    expected = sentence_transformer.encode(texts, convert_to_tensor=True, batch_size=64)
    r = post(embedder, "/v1/embeddings", {"input": texts, "model": "all-MiniLM-L6-v2",
                                          "truncate_prompt_tokens": 256})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    got = torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    assert got.shape == (64, 384)
    assert (got - expected).abs().max().item() < 1e-5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 64
    # one input alone, as text; and as token ids; and base64
    one = post(embedder, "/v1/embeddings", {"input": texts[3]}).json()["data"][0]["embedding"]
    assert (torch.tensor(one) - expected[3]).abs().max().item() < 1e-5
    ids = sentence_transformer.tokenizer(texts[2])["input_ids"]
    by_ids = post(embedder, "/v1/embeddings", {"input": ids}).json()["data"][0]["embedding"]
    assert (torch.tensor(by_ids) - expected[2]).abs().max().item() < 1e-5
    b64 = post(embedder, "/v1/embeddings", {"input": texts[3], "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(one, abs=1e-7)
    again = post(embedder, "/pooling", {"input": texts[3]}).json()["data"][0]["data"]
    assert again == pytest.approx(one, abs=1e-6)
    short = post(embedder, "/v1/embeddings", {"input": texts[3], "dimensions": 8})
    vector = torch.tensor(short.json()["data"][0]["embedding"])
    assert vector.shape == (8,) and abs(vector.norm().item() - 1) < 1e-5  # cut, then normed


def test_score_and_rerank_are_cosine_similarities(embedder, sentence_transformer):
    query, docs = "a fox in the forest", ["the quick brown fox", "stock prices fell", "a dog"]
    vectors = sentence_transformer.encode([query, *docs], convert_to_tensor=True)
    expected = (vectors[1:] @ vectors[0]).tolist()
    scored = post(embedder, "/v1/score", {"text_1": query, "text_2": docs}).json()
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = post(embedder, "/v2/rerank", {"query": query, "documents": docs, "top_n": 2}).json()
    order = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in ranked["results"]] == order
    assert ranked["results"][0]["document"]["text"] == docs[order[0]]
    for path in ("/rerank", "/v1/rerank"):
        bare = post(embedder, path, {"query": query, "documents": docs,
                                     "return_documents": False}).json()  # fmt: skip
        assert len(bare["results"]) == 3 and "document" not in bare["results"][0]


def test_bad_input_is_a_400_and_the_server_goes_on(embedder):
    long_text = "word " * 400
    for path, body, param in (
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": long_text}, "input"),  # over 256 tokens, not truncated
        ("/v1/embeddings", {"input": [[101, 999999, 102]]}, "input"),
        ("/v1/embeddings", {"input": "x", "dimensions": 1000}, "dimensions"),
        ("/v1/completions", {"prompt": "hi"}, "model"),  # the wrong endpoint for the model
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/classify", {"input": "x"}, "model"),  # an embedder classifies nothing
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
    ):
        r = post(embedder, path, body)
        assert r.status_code == 400, (path, body, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param, r.text
    assert httpx.get(embedder + "/health", timeout=5).status_code == 200
    ok = post(embedder, "/v1/embeddings", {"input": long_text, "truncate_prompt_tokens": 256})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256


# -- a cross-encoder -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification (one label) with MiniLM's tokenizer."""
    import transformers

    path = tmp_path_factory.mktemp("cross")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=128, num_labels=1,
                                     initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["colocated", "cluster"])
def reranker(request, cross_encoder_dir, tmp_path_factory):
    proc, base = serve(cross_encoder_dir, request.param, tmp_path_factory)
    yield base
    stop_cluster(proc)


def test_a_cross_encoder_scores_and_reranks_as_hugging_face(reranker, cross_encoder_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(cross_encoder_dir)
    hf = transformers.BertForSequenceClassification.from_pretrained(cross_encoder_dir).eval()
    query, docs = "fox", ["the quick brown fox", "stocks", "a lazy dog sleeps", "fox fox"]
    with torch.no_grad():
        batch = tok([query] * len(docs), docs, return_tensors="pt", padding=True)
        expected = hf(**batch).logits[:, 0].sigmoid().tolist()
    scored = post(reranker, "/score", {"text_1": query, "text_2": docs}).json()
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = post(reranker, "/rerank", {"query": query, "documents": docs, "top_n": 3}).json()
    order = sorted(range(len(docs)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx(
        [expected[i] for i in order], abs=1e-5)  # fmt: skip
    classified = post(reranker, "/classify", {"input": ["the quick brown fox"]}).json()
    assert classified["data"][0]["num_classes"] == 1
    assert classified["data"][0]["probs"][0] == pytest.approx(
        hf(**tok("the quick brown fox", return_tensors="pt")).logits[0, 0].sigmoid().item(),
        abs=1e-5)  # fmt: skip
