"""upstreams.transport.send: the pooled transport's direct path sends what an httpx.Request through
the same transport sends, and fails the same way."""
from __future__ import annotations

import asyncio
import gzip

import aiohttp
import httpx
import pytest
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from tests.procs import free_port
from upstreams.transport import RequestHeaders, body_parts, httpx_request, raw_parts, send

HEADERS = RequestHeaders([(b"content-type", b"application/json"), (b"user-agent", b"Django OpenAI Gateway"),
                          (b"x-extra", b"caf\xc3\xa9"), (b"x-twice", b"1"), (b"x-twice", b"2")])
TIMEOUTS = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


async def echo(request: web.Request) -> web.Response:
    if request.path == "/slow":
        await asyncio.sleep(1)
    if request.path == "/gzip":
        return web.Response(body=gzip.compress(b'{"zipped": true}' * 100), headers={"Content-Encoding": "gzip"})
    body = await request.read()
    seen = sorted((name.lower(), value) for name, value in request.raw_headers)
    return web.json_response({"method": request.method, "path": request.path_qs, "body": body.decode(),
                              "headers": [[name.decode(), value.decode("latin-1")] for name, value in seen]},
                             headers={"X-Answer": "yes"})


async def with_server(scenario):
    port = free_port()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    transport = AiohttpTransport()
    try:
        return await scenario(f"http://127.0.0.1:{port}", transport)
    finally:
        await transport.aclose()
        await runner.cleanup()


@pytest.mark.parametrize("content", [b'{"model": "m"}', b""])
def test_the_direct_path_sends_and_answers_as_an_httpx_request_does(content):
    async def scenario(base, transport):
        url = base + "/v1/chat/completions?x=1"
        direct = await send("POST", url, content, HEADERS, TIMEOUTS, transport)
        through_httpx = await transport.handle_async_request(httpx_request("POST", url, content, HEADERS, TIMEOUTS))
        answers = []
        for response in (direct, through_httpx):
            body = b"".join([part async for part in response.aiter_bytes()])
            await response.aclose()
            answers.append((response.status_code, response.headers["x-answer"], response.extensions["http_version"],
                            response.extensions["reason_phrase"], httpx.Response(200, content=body).json()))
        return answers

    direct, through_httpx = asyncio.run(with_server(scenario))
    assert direct == through_httpx
    sent = direct[4]
    assert sent["body"] == content.decode() and sent["path"] == "/v1/chat/completions?x=1"
    assert ["x-extra", "café".encode().decode("latin-1")] in sent["headers"]


def test_the_direct_path_fails_as_an_httpx_request_does():
    async def failures(url: str, timeout: dict) -> list[tuple[type, type]]:
        transport = AiohttpTransport()
        found = []
        try:
            for attempt in (lambda: send("POST", url, b"{}", HEADERS, timeout, transport),
                            lambda: transport.handle_async_request(httpx_request("POST", url, b"{}", HEADERS, timeout))):
                with pytest.raises(httpx.HTTPError) as caught:
                    await attempt()
                found.append((type(caught.value), type(caught.value.__cause__)))
        finally:
            await transport.aclose()
        return found

    refused = asyncio.run(failures(f"http://127.0.0.1:{free_port()}/v1/chat/completions", TIMEOUTS))
    # httpx-aiohttp's coarse mapping (a refused connection is a ConnectTimeout): its cause decides
    assert refused[0] == refused[1] and issubclass(refused[0][1], aiohttp.ClientConnectorError)

    async def slow(base, transport):
        return await failures(base + "/slow", {**TIMEOUTS, "read": 0.2})

    late = asyncio.run(with_server(slow))
    assert late[0] == late[1] and issubclass(late[0][0], httpx.TimeoutException)


def test_bodies_read_straight_from_aiohttp_are_the_bytes_httpx_gives():
    async def scenario(base, transport):
        found = {}
        for path in ("/v1/models", "/gzip"):
            for reader in (body_parts, raw_parts):
                direct = await send("GET", base + path, b"", HEADERS, TIMEOUTS, transport)
                through_httpx = await transport.handle_async_request(
                    httpx_request("GET", base + path, b"", HEADERS, TIMEOUTS))
                httpx_reader = through_httpx.aiter_bytes if reader is body_parts else through_httpx.aiter_raw
                try:
                    found[path, reader.__name__] = (b"".join([part async for part in reader(direct)]),
                                                    b"".join([part async for part in httpx_reader()]))
                finally:
                    await direct.aclose()
                    await through_httpx.aclose()
        return found

    found = asyncio.run(with_server(scenario))
    for (path, reader), (direct, through_httpx) in found.items():
        assert direct == through_httpx, (path, reader)
    assert found["/gzip", "body_parts"][0] == b'{"zipped": true}' * 100  # decoded, as httpx does
    assert found["/gzip", "raw_parts"][0] != found["/gzip", "body_parts"][0]  # raw: as sent
