"""Adapter calls from sync code (admin actions, management commands) close what they open."""
import httpx
from aiohttp import web

from upstreams import transport as transport_module
from upstreams.transport import call_from_sync, get_transport, reset_http_client


async def served_once() -> httpx.AsyncBaseTransport:
    """One real HTTP call through get_transport() against a local server; returns the transport."""
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]
        transport = get_transport()
        response = await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
        assert await response.aread() == b'{"ok": true}'
        return transport
    finally:
        await runner.cleanup()


def test_a_call_from_sync_code_closes_the_transport_it_used_and_leaves_the_pool_alone():
    reset_http_client()
    used = call_from_sync(served_once)
    assert used.client.closed  # no "Unclosed client session" left to the garbage collector
    assert not transport_module._transports  # no pooled transport was built for that loop
    assert call_from_sync(served_once) is not used  # each call has its own
