"""The server's front door: token, Host header and body size, checked before any route runs.

- With a token (required when binding beyond loopback), every request must carry it:
  `Authorization: Bearer T`, an `X-Vlrl-Token` header, a `token` query parameter, or the
  `vlrl_token` cookie that a page opened with `?token=T` receives (so the page's images
  and polling work without putting the token in every URL). Missing -> 401, wrong -> 403.
  Comparison is constant-time.
- Without a token the server only answers requests whose Host header names the loopback
  interface, so a web page on another site cannot reach it through DNS rebinding.
- A body larger than `max_body_bytes` gets 413 before it is read: by Content-Length when
  given, otherwise while it streams in (the body is buffered up to the limit, then handed
  to the app).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

COOKIE = "vlrl_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware around the FastAPI app (see the module docstring)."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int):
        self.app = app
        self.token = token
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        set_cookie = False
        if self.token is None:
            if not is_loopback(_host_name(headers.get("host", ""))):
                return await _reply(send, 403, "this server answers only requests to localhost / 127.0.0.1 (no token is set)")
        else:
            given, from_query = self._given_token(scope, headers)
            if given is None:
                return await _reply(
                    send, 401, "a token is required: open the page with ?token=... or send 'Authorization: Bearer ...'", [(b"www-authenticate", b"Bearer")]
                )
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _reply(send, 403, "wrong token")
            set_cookie = from_query
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "invalid Content-Length")
            if int(length) > self.max_body:
                return await _reply(send, 413, f"request body of {int(length)} bytes is over the limit of {self.max_body} bytes")
        elif scope.get("method") in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await _reply(send, 413, f"request body is over the limit of {self.max_body} bytes")
                if not msg.get("more_body"):
                    break
            body, sent = b"".join(chunks), False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay
        if set_cookie:
            send = self._with_cookie(send)
        return await self.app(scope, receive, send)

    def _given_token(self, scope, headers: dict[str, str]) -> tuple[str | None, bool]:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if "x-vlrl-token" in headers:
            return headers["x-vlrl-token"], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        if "cookie" in headers:
            morsel = SimpleCookie(headers["cookie"]).get(COOKIE)
            if morsel is not None:
                return morsel.value, False
        return None, False

    def _with_cookie(self, send):
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie)]}
            await send(msg)

        return wrapped
