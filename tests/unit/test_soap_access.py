"""Who may call SOAP's HTTP API, and what it reads of a request (no Ray, no server: the functions themselves).

Over real HTTP through Ray Serve the same rules are tested in tests/integration/test_serving.py (413 on a declared
and a streamed body, 401/200 in token mode, request ids in the replica's log).
"""

from __future__ import annotations

import asyncio
import stat

import orjson
import pytest

from serving.http_guard import RequestGuard, byte_size
from serving.settings import app_settings, check_access, is_loopback, load_token


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_token(host):
    assert is_loopback(host)
    check_access(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "soap.example.org", ""])
def test_binding_beyond_loopback_without_a_token_is_refused_naming_the_setting(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="serving.token_file") as err:
        check_access(host, None)
    assert repr(host) in str(err.value)
    check_access(host, "stack/soap-token")  # with a token it may


def test_app_settings_refuse_an_open_host_without_a_token_and_never_carry_the_token(tmp_path):
    from sum_platform.config import load_params

    params = load_params()
    open_ = params.model_copy(update={"serving": params.serving.model_copy(update={"host": "0.0.0.0"})})
    with pytest.raises(ValueError, match="not a loopback address"):
        app_settings(open_)
    token_file = tmp_path / "token"
    guarded = open_.model_copy(update={"serving": open_.serving.model_copy(update={"token_file": str(token_file)})})
    settings = app_settings(guarded)
    assert settings["token_file"] == str(token_file) and settings["max_request_bytes"] == 1 << 20
    token = load_token(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(token) >= 32
    assert load_token(token_file) == token  # generated once
    assert token not in orjson.dumps(settings).decode()


def test_byte_sizes_read_as_an_operator_writes_them():
    assert [byte_size(n) for n in (1 << 20, 3 << 19, 1024, 100)] == ["1 MiB", "1.5 MiB", "1 KiB", "100 bytes"]


def _call(headers: list[tuple[bytes, bytes]], chunks: list[bytes], *, token: str | None = None,
          path: str = "/embeddings/batch"):
    """One request through a guard (limit 1 KiB) in front of an app that reads the body and answers 200.

    Returns:
        ``(status, headers, body, chunks the server side read, what the app saw or None)``.
    """
    sent: list[dict] = []
    read = [0]
    seen: dict = {}

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive_, send_):
        body = b""
        while True:
            msg = await receive_()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen.update(body=body, request_id=scope["state"]["request_id"])
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(app, max_request_bytes=1024, token=token)
    asyncio.run(guard({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"], read[0], seen or None


def test_a_declared_body_over_the_limit_is_refused_before_a_byte_is_read():
    status, headers, body, read, seen = _call([(b"content-length", b"1025")], [b"x" * 1025])
    assert status == 413 and read == 0 and seen is None and headers[b"connection"] == b"close"
    answer = orjson.loads(body)
    assert answer["detail"].startswith("request body over 1 KiB (serving.max_request_bytes); request id ")
    assert answer["request_id"] == headers[b"x-request-id"].decode()


def test_a_streamed_body_is_read_up_to_the_limit_and_no_further():
    status, headers, _, read, seen = _call([(b"transfer-encoding", b"chunked")], [b"x" * 400] * 10)
    assert status == 413 and read == 3 and seen is None and headers[b"connection"] == b"close"  # 1200 of 4000 bytes


def test_bodies_within_the_limit_reach_the_app_whole_with_the_callers_request_id():
    for headers, chunks in (([(b"content-length", b"1024")], [b"y" * 1024]),
                            ([(b"transfer-encoding", b"chunked")], [b"y" * 512, b"y" * 512])):
        status, out, body, _, seen = _call([*headers, (b"x-request-id", b"caller-42")], chunks)
        assert status == 200 and body == b"ok" and seen == {"body": b"y" * 1024, "request_id": "caller-42"}
        assert out[b"x-request-id"] == b"caller-42"


def test_a_malformed_request_id_is_replaced_by_a_generated_one():
    _, out, _, _, seen = _call([(b"x-request-id", b"bad id\r\nwith spaces")], [b""])
    rid = out[b"x-request-id"].decode()
    assert seen["request_id"] == rid and " " not in rid and rid.count("-") == 1


@pytest.mark.parametrize("auth, path, expected", [
    (None, "/version", 401),
    (b"Bearer wrong-token-of-some-length", "/version", 401),
    (b"Basic s3cret-token", "/version", 401),
    (b"Bearer s3cret-token", "/version", 200),
    (b"bearer s3cret-token", "/users/1/embeddings", 200),
    (None, "/healthz", 200),
])
def test_with_a_token_every_request_but_healthz_must_carry_it(auth, path, expected):
    headers = [(b"authorization", auth)] if auth else []
    status, out, body, _, seen = _call(headers, [b""], token="s3cret-token", path=path)
    assert status == expected, body
    if expected == 401:
        assert seen is None and out[b"www-authenticate"] == b"Bearer"
        assert b"s3cret" not in body and orjson.loads(body)["detail"].startswith("missing or wrong bearer token")


def test_a_store_failure_storm_logs_its_request_ids_first_and_last_of_those_left_out(caplog, monkeypatch):
    from serving import client

    now = [100.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(client, "_STORE_ERRORS", client._ThrottledError(every_s=10.0))
    failure = client.StoreUnavailable("online store read failed for 1 users: DatabaseError: file is not a database",
                                      "online store read failed (DatabaseError)")
    with caplog.at_level("ERROR", logger=client.log.name):
        for n in range(1, 101):
            client.log_store_failure(failure, f"ab-{n:x}")
            now[0] += 0.01
        now[0] = 111.0
        client.log_store_failure(failure, "ab-ff")
    assert [r.getMessage() for r in caplog.records] == [
        "request ab-1: online store read failed for 1 users: DatabaseError: file is not a database",
        "request ab-ff: online store read failed for 1 users: DatabaseError: file is not a database "
        "(and 99 more in the last 11 s, request ids ab-2 .. ab-64)"]
    assert "DatabaseError" in failure.reason and "file is not" not in failure.reason
