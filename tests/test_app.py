"""The HTTP API in front of a real DecoderService (real model, real tree store), through
FastAPI's TestClient and the official openai client, unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ctxtree.store import TreeStore
from ctxtree.pipelines.document import CompressSettings, compress_document
from ctxtree.serve.app import build_app
from ctxtree.serve.service import DecoderService, ServiceConfig
from tests.conftest import REPO

TEXT = (REPO / "samples" / "GPL-3.txt").read_text()[:6000]


@pytest.fixture(scope="module")
def service(smollm_runtime, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("app-store"))
    compress_document(smollm_runtime, TreeStore(uri), "contracts/gpl.txt", TEXT, CompressSettings())
    svc = DecoderService(ServiceConfig(store=uri, max_documents=3, max_answer_tokens=200), runtime=smollm_runtime)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(build_app(service, api_token="")) as c:
        yield c


def sse_events(text: str) -> list:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_query_json_and_stream_agree(client):
    body = {"documents": ["contracts/gpl.txt"], "question": "What is this license?", "max_tokens": 12}
    r = client.post("/v1/query", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answer"] and data["usage"]["completion_tokens"] >= 1
    assert set(data["timings"]) >= {"load_ms", "ttft_ms", "total_ms"} and data["documents"] == body["documents"]
    r = client.post("/v1/query", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e) for e in events[:-1]]
    assert pieces[-1]["done"] is True
    assert "".join(p.get("text", "") for p in pieces).strip() == data["answer"]


def test_openai_client_unchanged(client):
    import openai

    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    models = oa.models.list()
    assert len(models.data) == 1 and models.data[0].id.startswith("SmolLM2")
    kwargs = dict(model=models.data[0].id, messages=[{"role": "user", "content": "What is this license?"}],
                  max_tokens=10, extra_body={"documents": ["contracts/gpl.txt"]})
    done = oa.chat.completions.create(**kwargs)
    assert done.choices[0].message.content and done.usage.completion_tokens >= 1
    assert done.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(**kwargs, stream=True))
    assert streamed.strip() == done.choices[0].message.content


@pytest.mark.parametrize("body,status,code", [
    ({"documents": ["missing"], "question": "x"}, 404, "document_not_found"),
    ({"documents": ["contracts/gpl.txt"]}, 422, "invalid_request"),
    ({"documents": ["contracts/gpl.txt"], "question": "x", "bogus": 1}, 422, "invalid_request"),
    ({"documents": ["contracts/gpl.txt"], "question": "x", "temperature": -1}, 422, "invalid_request"),
    ({"documents": ["a", "b", "c", "d"], "question": "x"}, 413, "request_too_large"),
    ({"documents": ["contracts/gpl.txt"], "question": "x", "max_tokens": 1000}, 413, "request_too_large"),
    ({"documents": ["../../etc/passwd"], "question": "x"}, 404, "document_not_found"),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(client, body, status, code):
    r = client.post("/v1/query", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    ok = client.post("/v1/query", json={"documents": ["contracts/gpl.txt"], "question": "Who?", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_wrong_method_says_which_are_allowed(client):
    r = client.get("/v1/query")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_documents_prewarm_health_and_metrics(client):
    r = client.get("/v1/documents/contracts/gpl.txt")
    assert r.status_code == 200 and r.json()["tokens"] > 1000 and r.json()["compatible"] is True
    assert client.get("/v1/documents/nope").status_code == 404
    assert client.post("/v1/prewarm", json={"documents": ["contracts/gpl.txt"]}).json()["bytes"] > 0
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    hits = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("ctxtree_tree_cache_hits_total")))
    misses = float(next(line.split()[-1] for line in text.splitlines()
                         if line.startswith("ctxtree_tree_cache_misses_total")))
    assert misses >= 1 and hits >= 1
    assert "ctxtree_time_to_first_token_seconds_count" in text and 'path="/v1/query",status="200"' in text


def test_bearer_token_when_configured(service):
    with TestClient(build_app(service, api_token="s3cret")) as c:
        body = {"documents": ["contracts/gpl.txt"], "question": "Who?", "max_tokens": 2}
        assert c.post("/v1/query", json=body).status_code == 401
        assert c.post("/v1/query", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/query", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_errors_name_the_document_and_the_problem_never_a_server_path(service, client):
    """A damaged store is refused, and the body says which document and what kind of
    problem, without the store's location (the replica's log has that)."""
    store, root = service.store, service.store.objects.root
    damaged = {"damaged/missing-shard.txt": "missing", "damaged/flipped-shard.txt": "flip"}
    for i, (doc_id, harm) in enumerate(damaged.items()):
        compress_document(service.rt, store, doc_id, TEXT[:1500] + f"\nCopy {i}.", CompressSettings())
        shard = Path(root) / store.manifest(doc_id).shards[0].name
        if harm == "missing":
            shard.unlink()
        else:
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
    expected = {"damaged/missing-shard.txt": (404, "document_not_found", "missing"),
                "damaged/flipped-shard.txt": (500, "corrupt_tree_object", "corrupt")}
    for doc_id, (status, code, word) in expected.items():
        for r in (client.post("/v1/query", json={"documents": [doc_id], "question": "Who?", "max_tokens": 2}),
                  client.post("/v1/prewarm", json={"documents": [doc_id]})):
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["code"] == code and doc_id in error["message"] and word in error["message"]
            for secret in (str(root), str(Path(root).parent), ".ctt", "/tmp", "trees/"):
                assert secret not in r.text, f"{secret!r} leaked in {r.text}"
    unknown = client.post("/v1/query", json={"documents": ["/etc/hostname"], "question": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "unknown document '/etc/hostname'"
    ok = client.post("/v1/query", json={"documents": ["contracts/gpl.txt"], "question": "Who?", "max_tokens": 2})
    assert ok.status_code == 200


def test_openai_client_parameters_are_honoured_or_refused(client):
    """What the official client sends: text parts, stop, max_completion_tokens, seed, user,
    stream_options; n > 1, another model's name and unsupported features are refused."""
    import openai

    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    model = oa.models.list().data[0].id
    docs = {"documents": ["contracts/gpl.txt"]}
    question = "What is this license about?"
    base = dict(model=model, max_completion_tokens=16, seed=3, user="someone", extra_body=docs)

    plain = oa.chat.completions.create(messages=[{"role": "user", "content": question}], **base)
    text = plain.choices[0].message.content
    parts = oa.chat.completions.create(messages=[{"role": "user", "content": [{"type": "text", "text": question}]}],
                                       **base)
    assert parts.choices[0].message.content == text and plain.usage.completion_tokens <= 16

    # stop: the answer ends right before the first stop sequence, streamed or not
    assert len(text.strip()) >= 2, text
    stop = text.strip()[len(text.strip()) // 2:]   # the answer's second half
    stopped = oa.chat.completions.create(messages=[{"role": "user", "content": question}], stop=[stop], **base)
    assert stopped.choices[0].message.content == text[:text.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(oa.chat.completions.create(messages=[{"role": "user", "content": question}], stop=stop,
                                               stream=True, stream_options={"include_usage": True}, **base))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == \
        stopped.choices[0].message.content
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
    no_usage = list(oa.chat.completions.create(messages=[{"role": "user", "content": question}], stream=True, **base))
    assert all(c.choices for c in no_usage) and no_usage[-1].choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(messages=[{"role": "user", "content": question}], n=2, **base)
    assert e.value.code == "unsupported_parameter" and "n = 2" in e.value.message
    for refused in (dict(logprobs=True), dict(response_format={"type": "json_object"}),
                    dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])):
        with pytest.raises(openai.BadRequestError):
            oa.chat.completions.create(messages=[{"role": "user", "content": question}], **base, **refused)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}], **base)
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(messages=[{"role": "user", "content": question}], **{**base, "model": "gpt-4o"})
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(messages=[{"role": "user", "content": question}], stream=True,
                                   **{**base, "model": "gpt-4o"})


def test_operator_configured_model_alias(service):
    with TestClient(build_app(service, api_token="", model_aliases=("my-docs-model",))) as c:
        body = {"model": "my-docs-model", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 2,
                "documents": ["contracts/gpl.txt"]}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/chat/completions", json={**body, "model": "ctxtree"}).status_code == 200
        assert c.post("/v1/chat/completions", json={**body, "model": "gpt-4o"}).status_code == 404


async def asgi_post_async(app, parts: list[bytes], hang: bool, client=("127.0.0.1", 5000)) -> list[dict]:
    """POST /v1/query straight into the ASGI app: the body in `parts`, then (hang) nothing
    more, as a client that announced more bytes than it sends."""
    import asyncio

    parts, sent = list(parts), []

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts) or hang}
        await asyncio.sleep(60)  # never: the test's bound ends it first
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/query", "raw_path": b"/v1/query", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
             "client": client, "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return sent


def asgi_post(app, parts: list[bytes], hang: bool) -> list[dict]:
    import asyncio

    return asyncio.run(asgi_post_async(app, parts, hang))


def test_a_slow_body_is_cut_off_and_clients_can_be_capped(service):
    import asyncio

    from ctxtree.serve.limits import ClientLimits

    app = build_app(service, api_token="", limits=ClientLimits(body_timeout_s=0.5))
    t0 = time.monotonic()
    sent = asgi_post(app, [b'{"documents": ["contracts/gpl.txt"], '], hang=True)
    assert sent[0]["status"] == 408 and time.monotonic() - t0 < 5
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
    body = json.dumps({"documents": ["contracts/gpl.txt"], "question": "Who?", "max_tokens": 2}).encode()
    assert asgi_post(app, [body[:20], body[20:]], hang=False)[0]["status"] == 200  # in time, in pieces: fine

    capped = build_app(service, api_token="", limits=ClientLimits(body_timeout_s=2, max_per_client=1))

    async def two_at_once():
        slow = asyncio.create_task(asgi_post_async(capped, [b"{"], hang=True))   # holds this client's slot
        await asyncio.sleep(0.2)
        second = await asgi_post_async(capped, [body], hang=False)
        other = await asgi_post_async(capped, [body], hang=False, client=("127.0.0.2", 5000))
        return await slow, second, other

    slow, second, other = asyncio.run(two_at_once())
    assert second[0]["status"] == 429 and json.loads(second[1]["body"])["error"]["code"] == "too_many_requests"
    assert other[0]["status"] == 200 and slow[0]["status"] == 408
    assert asgi_post(capped, [body], hang=False)[0]["status"] == 200   # the slot is free again
