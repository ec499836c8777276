"""A CPU/build pair that would crash llama.cpp (AMX advertised + AMX compiled in): the load is made safe, or
refused with the documented error; it never takes the process down. The CPU facts are simulated here."""
from __future__ import annotations

import llama_cpp
import polargrid
import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine
from polargrid_local.host import llama_safety

AMX_INFO = ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
            "REPACK = 1 |")


@pytest.fixture()
def params_seen(monkeypatch):
    """The use_extra_bufts of every model llama.cpp loads from here on."""
    seen: list[bool] = []
    original = llama_cpp.llama_cpp.llama_model_load_from_file

    def spy(path, params):
        seen.append(bool(params.use_extra_bufts))
        return original(path, params)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_load_from_file", spy)
    yield seen
    llama_safety.set_extra_bufts(True)


@pytest.fixture()
def amx_cpu(monkeypatch):
    monkeypatch.setattr(llama_safety, "cpu_flags", lambda: {"avx2", "amx_tile", "amx_int8", "amx_bf16"})
    monkeypatch.setattr(llama_safety, "system_info", lambda: AMX_INFO)


def test_the_crash_prone_pair_is_recognised(amx_cpu, monkeypatch):
    assert llama_safety.facts().crash_prone
    monkeypatch.setattr(llama_safety, "system_info", lambda: AMX_INFO.replace("AMX_INT8 = 1 | ", ""))
    assert not llama_safety.facts().crash_prone, "an AMX CPU with a build without AMX is fine"
    monkeypatch.setattr(llama_safety, "system_info", lambda: AMX_INFO)
    monkeypatch.setattr(llama_safety, "cpu_flags", lambda: {"avx2"})
    assert not llama_safety.facts().crash_prone, "an AMX build on a CPU without AMX never takes the AMX path"


def test_on_a_crash_prone_pair_models_load_without_extra_buffer_types_and_work(registry, amx_cpu, params_seen):
    engine = LocalEngine(registry)
    try:
        reply = engine.chat_completion(chat_request(max_tokens=4))
        assert reply.choices[0].message.content
        assert engine.embeddings({"model": "smollm2-135m-embed", "input": "x"}).data
    finally:
        engine.close()
    assert params_seen and not any(params_seen), "weights must stay out of AMX/repack buffers"


def test_a_normal_pair_loads_as_usual(registry, params_seen):
    engine = LocalEngine(registry)
    try:
        engine.chat_completion(chat_request(max_tokens=2))
    finally:
        engine.close()
    assert params_seen and all(params_seen)


def test_without_a_safe_load_the_error_names_the_fix(registry, amx_cpu, params_seen, monkeypatch):
    monkeypatch.setattr(llama_safety, "safe_load_supported", lambda: False)
    engine = LocalEngine(registry)
    try:
        with pytest.raises(polargrid.ServerError, match="polargrid-local install-llama") as info:
            engine.chat_completion(chat_request(max_tokens=2))
        assert "AMX" in str(info.value)
        assert engine.get_model_status().loading_status[CHAT] == "failed"
    finally:
        engine.close()
    assert params_seen == [], "nothing reached llama.cpp"


def test_this_llama_cpp_python_exposes_the_safe_load():
    assert llama_safety.safe_load_supported()
