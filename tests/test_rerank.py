"""POST /v1/rerank and client.rerank(...): the chat-model judge (read from the batch scheduler's probe), embedding
cosine, and a registry ``rerank`` entry (llama.cpp rank pooling), each checked against an independent computation."""
from __future__ import annotations

import asyncio
import math
import shutil

import httpx
import numpy as np
import pytest
from conftest import CHAT

from polargrid_local import LocalEngine, PolarGrid, PolarGridSync, Registry
from polargrid_local.errors import NotFoundError, ValidationError
from polargrid_local.llm.rerank import NO, YES, judge_messages
from polargrid_local.server import running

QUERY = "How do I reset a forgotten password?"
DOCS = ["Bananas are a good source of potassium.",
        "If you forgot your password, click 'Forgot password' on the sign-in page and follow the emailed link.",
        "Our office is closed on public holidays.",
        "Passwords must be at least 12 characters long."]


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as srv:
        yield srv


def post(server, body):
    return httpx.post(server.url + "/v1/rerank", json=body, timeout=300)


def test_http_rerank_shape_order_top_n_and_documents(server):
    reply = post(server, {"model": "text-embedding-3-small", "query": QUERY, "documents": DOCS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["method"] == "cosine" and body["model"] == "text-embedding-3-small"
    assert body["usage"]["total_tokens"] > 0
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3]
    assert body["results"][0] == {"index": 1, "relevance_score": scores[0], "document": {"text": DOCS[1]}}
    short = post(server, {"model": "minilm", "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
                          "return_documents": False}).json()
    assert [r["index"] for r in short["results"]] == [r["index"] for r in body["results"][:2]]
    assert all("document" not in r for r in short["results"])
    judged = post(server, {"model": "rerank-1", "query": QUERY, "documents": DOCS}).json()
    assert judged["method"] == "judge" and len(judged["results"]) == 4
    assert all(0.0 < r["relevance_score"] < 1.0 for r in judged["results"])
    assert judged["usage"]["prompt_tokens"] > 4 * 40  # the judge's prompt per document


def test_bad_rerank_requests_are_400_or_404(server):
    for body, status, words in [
        ({"query": QUERY, "documents": []}, 400, "documents"),
        ({"query": "", "documents": DOCS}, 400, "query"),
        ({"query": QUERY, "documents": ["ok", 3]}, 400, "documents[1]"),
        ({"query": QUERY, "documents": DOCS, "top_n": 0}, 400, "top_n"),
        ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, 400, "return_documents"),
        ({"query": QUERY, "documents": DOCS, "temperature": 1}, 400, "unknown"),
        ({"model": "whisper-1", "query": QUERY, "documents": DOCS}, 404, "cannot rerank"),
        ({"model": "nope", "query": QUERY, "documents": DOCS}, 404, "cannot rerank"),
    ]:
        reply = post(server, body)
        assert reply.status_code == status and words in reply.json()["error"]["message"], (body, reply.text)


def reference_judge(registry, query: str, documents: list[str]) -> list[float]:
    """P(yes) / (P(yes) + P(no)) for each document, from llama-cpp-python's Llama evaluating each prompt alone."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=str(registry.get(CHAT).path_in(registry.cache_dir)), n_ctx=1024,
                          n_threads=2, logits_all=True, verbose=False)
    try:
        template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                       bos_token="<|im_start|>")
        first = lambda words: list(dict.fromkeys(llm.tokenize(w.encode(), add_bos=False, special=False)[0]  # noqa: E731
                                                 for w in words))
        yes = first(YES)
        no = [t for t in first(NO) if t not in yes]
        scores = []
        for document in documents:
            tokens = llm.tokenize(template(messages=judge_messages(query, document)).prompt.encode(), add_bos=False,
                                  special=True)
            llm.reset()
            llm.eval(tokens)
            logits = np.asarray(llm.scores[len(tokens) - 1], dtype=np.float64)
            log_p = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            p_yes, p_no = np.exp(log_p[yes]).sum(), np.exp(log_p[no]).sum()
            scores.append(float(p_yes / (p_yes + p_no)))
        return scores
    finally:
        llm.close()


def test_the_judge_reads_each_documents_own_next_token_distribution(client, registry):
    """Eight prompts decoded in one batch: each score must be the one its prompt gives when evaluated alone."""
    documents = DOCS + ["Forgotten passwords can be reset from the account page.", "The sky is blue.",
                        "Reset links expire after 30 minutes.", "Cats sleep for 16 hours a day."]
    got = client.rerank({"model": CHAT, "query": QUERY, "documents": documents, "return_documents": False})
    by_index = {r.index: r.relevance_score for r in got.results}
    expected = reference_judge(registry, QUERY, documents)
    assert len(set(round(s, 3) for s in expected)) > 4, "the reference separates the documents"
    for i, want in enumerate(expected):   # a batch rounds differently from a prompt alone: by up to ~0.03 here
        assert abs(by_index[i] - want) < 0.05, (i, by_index[i], want)


def test_the_judge_without_a_batch_scheduler_gives_the_same_scores(client, registry):
    batched = client.rerank({"model": CHAT, "query": QUERY, "documents": DOCS})
    with PolarGridSync(models=registry, n_parallel=1) as plain:
        alone = plain.rerank({"model": CHAT, "query": QUERY, "documents": DOCS})
        assert type(plain.engine.pool.worker(registry.get(CHAT))[0].backend).__name__ == "LlamaBackend"
    for a, b in zip(sorted(batched.results, key=lambda r: r.index), sorted(alone.results, key=lambda r: r.index),
                    strict=True):
        assert abs(a.relevance_score - b.relevance_score) < 0.05   # batched and alone round apart, ~0.03


def test_cosine_is_the_embedding_models_cosine(client):
    got = client.rerank({"model": "all-minilm-l6-v2", "query": QUERY, "documents": DOCS})
    vectors = np.asarray([d.embedding for d in client.embeddings({"model": "all-minilm-l6-v2",
                                                                   "input": [QUERY, *DOCS]}).data])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for result in got.results:
        assert result.relevance_score == pytest.approx(float(vectors[result.index + 1] @ vectors[0]), abs=1e-5)


def test_in_process_errors_and_async(client, engine):
    with pytest.raises(ValidationError, match="documents"):
        client.rerank({"query": QUERY, "documents": "not a list"})
    with pytest.raises(NotFoundError):
        client.rerank({"model": "tts-1", "query": QUERY, "documents": DOCS})
    folded = asyncio.run(PolarGrid(engine=engine).rerank({"model": "minilm", "query": QUERY, "documents": DOCS,
                                                         "top_n": 1}))
    assert [r.index for r in folded.results] == [1]


# -- a registry rerank entry: a BERT cross-encoder through llama.cpp's rank pooling ----------------

def _cross_encoder_folder(registry, tmp_path):
    """all-MiniLM-L6-v2's checkpoint with a classification head (seeded): BertForSequenceClassification's layout."""
    from safetensors.numpy import load_file, save_file

    source = registry.get("all-minilm-l6-v2").path_in(registry.cache_dir).parent / "hf"
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    weights = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(23)
    weights["classifier.weight"] = rng.normal(0, 0.3, (1, 384)).astype(np.float32)
    weights["classifier.bias"] = np.asarray([0.1], np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def _reference_scores(folder, query: str, documents: list[str]) -> tuple[list[float], int]:
    """sigmoid(classifier(tanh(pooler([CLS] hidden state)))) for "[CLS] query [SEP] document [SEP]", in numpy."""
    from polargrid_local.store.bert_reference import NumpyBert

    bert = NumpyBert(folder)
    w = bert.w
    scores, tokens = [], 0
    for document in documents:
        ids = np.asarray([bert.tokenizer.encode(query, document).ids])
        tokens += ids.shape[1]
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:ids.shape[1]]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = bert._norm(x, "embeddings.LayerNorm")
        bias = np.zeros((1, 1, 1, ids.shape[1]), np.float32)
        for i in range(bert.n_layer):
            x = bert._layer(x, bias, f"encoder.layer.{i}.")
        pooled = np.tanh(x[0, 0] @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
        logit = float(pooled @ w["classifier.weight"][0] + w["classifier.bias"][0])
        scores.append(1.0 / (1.0 + math.exp(-logit)))
    return scores, tokens


def test_a_rerank_entry_scores_pairs_with_llama_cpp_rank_pooling(registry, tmp_path):
    from polargrid_local.store.convert import bert_rerank_to_gguf

    folder = _cross_encoder_folder(registry, tmp_path)
    gguf = tmp_path / "cross-encoder.gguf"
    bert_rerank_to_gguf(folder, gguf)
    models = tmp_path / "models.toml"
    models.write_text(f'[defaults]\nrerank = "tiny-cross-encoder"\n\n[[models]]\nid = "tiny-cross-encoder"\n'
                      f'kind = "rerank"\nlocal = "{gguf}"\n[models.engine]\nn_ctx = 512\n')
    engine = LocalEngine(Registry.load(models, tmp_path, models_only=True))
    try:
        got = PolarGridSync(engine=engine).rerank({"model": "rerank-1", "query": QUERY, "documents": DOCS})
    finally:
        engine.close()
    assert got.method == "cross-encoder"
    expected, tokens = _reference_scores(folder, QUERY, DOCS)
    assert max(expected) - min(expected) > 0.05, "the head separates the pairs"
    for result in got.results:
        assert result.relevance_score == pytest.approx(expected[result.index], abs=0.01), result
    assert got.usage.total_tokens == tokens, "each pair is [CLS] query [SEP] document [SEP]"
