"""The decoder replica's service with the real default model over a real tree store:
answers equal `ctxtree ask`'s for the same trees, concurrent requests batch, and bad
requests are refused before anything streams."""

from __future__ import annotations

import asyncio

import pytest

from ctxtree.answer import answer_question
from ctxtree.store import FingerprintMismatch, NotFound, TreeStore
from ctxtree.kernels.generate import SamplingConfig
from ctxtree.pipelines.document import CompressSettings, compress_document
from ctxtree.serve.service import AnswerEnd, DecoderService, RequestTooLarge, ServiceConfig
from tests.conftest import REPO

DOCS = {"gpl": (REPO / "samples" / "GPL-3.txt").read_text()[:9000],
        "apache": (REPO / "samples" / "corpus" / "license-Apache-2.0.txt").read_text()}


@pytest.fixture(scope="module")
def service(smollm_runtime, tmp_path_factory):
    store_uri = str(tmp_path_factory.mktemp("svc-store"))
    store = TreeStore(store_uri)
    for doc_id, text in DOCS.items():
        compress_document(smollm_runtime, store, doc_id, text, CompressSettings())
    svc = DecoderService(ServiceConfig(store=store_uri, max_documents=2, max_question_tokens=80,
                                       max_answer_tokens=32, batch_wait_ms=30), runtime=smollm_runtime)
    yield svc
    svc.close()


async def collect(svc, docs, question, sampling=SamplingConfig(max_tokens=12)):
    pieces, end = [], None
    async for item in svc.answer(docs, question, sampling):
        if isinstance(item, AnswerEnd):
            end = item
        else:
            pieces.append(item)
    return "".join(pieces), end


def test_answer_equals_ask_for_the_same_trees(service, smollm_runtime):
    text, end = asyncio.run(collect(service, ["gpl"], "What is this license called?"))
    store = service.store
    tree = store.load_tree(store.manifest("gpl", smollm_runtime.fingerprint))
    ref = answer_question(smollm_runtime, [tree], "What is this license called?", SamplingConfig(max_tokens=12))
    assert text.strip() == ref.text and end.completion_tokens == len(ref.token_ids)
    assert end.timings["ttft_ms"] > 0 and end.timings["total_ms"] >= end.timings["ttft_ms"]
    assert len(end.selections) == 1 and all(len(chunk) == 4 for chunk in end.selections[0])


def test_concurrent_requests_are_batched_and_answered_alike(service):
    questions = [(["gpl"], "Who may copy this license?"), (["apache"], "What does the license grant?"),
                 (["gpl", "apache"], "Which licenses are these?")]

    async def together():
        return await asyncio.gather(*[collect(service, d, q) for d, q in questions])

    before = len(service.engine.batch_sizes)
    batched = asyncio.run(together())
    assert max(service.engine.batch_sizes[before:]) >= 2
    alone = [asyncio.run(collect(service, d, q)) for d, q in questions]
    assert [t for t, _ in batched] == [t for t, _ in alone]
    assert service.cache.stats.misses == 2  # each document loaded once, whatever the traffic


def test_bad_requests_are_refused_before_streaming(service, tmp_path):
    async def first(docs, question, **kw):
        return await collect(service, docs, question, **kw)

    with pytest.raises(NotFound, match="unknown document 'nope'"):
        asyncio.run(first(["nope"], "What?"))
    with pytest.raises(RequestTooLarge, match="at most 2"):
        asyncio.run(first(["gpl", "apache", "x"], "What?"))
    with pytest.raises(RequestTooLarge, match="question is"):
        asyncio.run(first(["gpl"], "why " * 100))
    with pytest.raises(RequestTooLarge, match="max_tokens"):
        asyncio.run(first(["gpl"], "What?", sampling=SamplingConfig(max_tokens=500)))
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(first(["gpl"], "   "))
    info = asyncio.run(service.document("gpl"))
    assert info["tokens"] > 1000 and info["compatible"] and info["cached"]
    other = DecoderService(ServiceConfig(store=service.config.store), runtime=service.rt)
    other.cache.fingerprint = "f" * 64  # a replica running another model
    with pytest.raises(FingerprintMismatch):
        asyncio.run(collect(other, ["gpl"], "What?"))
    other.close()
