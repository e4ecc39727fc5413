"""Pure-ASGI pieces shared by the services' fast paths (ingestion's submit, the worker's infer).

A fast path answers one well-formed, hot request without FastAPI's routing, middleware and
dependency layers; anything it does not answer itself goes on to the FastAPI route with its body
replayed, so every refusal stays the route's own (status, message, OpenAPI schema).
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Message, Receive, Send


async def read_body(receive: Receive, limit: int) -> tuple[bytes, bool] | None:
    """The request body, read up to ``limit`` bytes: (body, over_limit).

    Reading stops at the first chunk past ``limit`` (``over_limit`` True, the body cut there).
    None when the client went away before sending all of it.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), True
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def no_receive() -> Message:
    """A ``receive`` for responses sent outside a request's own cycle."""
    return {"type": "http.disconnect"}


async def send_response(send: Send, response: Response) -> None:
    """Send a whole Starlette response straight through ASGI (outside the app)."""
    await response({"type": "http"}, no_receive, send)


async def send_json(send: Send, status: int, payload: bytes) -> None:
    """Send an already-serialised JSON body: two ASGI messages, no response object."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
