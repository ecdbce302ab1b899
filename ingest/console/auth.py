"""Who may use the console, and how a request proves it.

- The pages: a login with a user name and password ([console] users), then a session in a signed
  cookie (HMAC-SHA256 with a key this process draws at start: a restart ends every login). Every
  action (a POST) carries the session's CSRF token, in a form field or the X-CSRF-Token header.
- The JSON API: `Authorization: Bearer TOKEN` ([console] tokens); no cookie, so no CSRF. A session
  works there too, with the same CSRF rule.
- readonly = true: every POST but log in and log out is refused (403).
- Only the Host names of [console] allowed_hosts (and loopback, and [console] host) are answered: a
  page elsewhere cannot reach the console through a DNS name of its own pointed at 127.0.0.1.
- The cookies' names carry the console's port: two consoles on one host keep their own logins
  (browsers keep cookies per host name, not per port).
Nothing here logs or echoes a password, a token or a cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import orjson
from aiohttp import web

from ..config import ConsoleConfig
from ..http import client_address

LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC = ("/login", "/static/")  # no login needed (prefixes)


@dataclass(frozen=True)
class Who:
    """The user of a request: a user name, or "token N" (its place in [console] tokens, never the token)."""

    name: str
    via: str  # "session" or "token"
    csrf: str | None = None  # a session's CSRF token
    session: str | None = None  # a session's id (for log out)


WHO = web.RequestKey("who", Who)


def session_cookie(config: ConsoleConfig) -> str:
    """The session cookie's name, per console: hipcall_console_8081."""
    return f"hipcall_console_{config.port}"


def login_cookie(config: ConsoleConfig) -> str:
    """The login form's CSRF token's cookie (double-submitted), per console."""
    return f"hipcall_console_login_{config.port}"


def client(config: ConsoleConfig, request: web.Request) -> str:
    """The client's address as the ingress decides it: the peer, or a trusted proxy's X-Forwarded-For hop."""
    return client_address(request.remote, request.headers.getall("X-Forwarded-For", []), config.trusted_proxies)


def host_allowed(config: ConsoleConfig, header: str | None) -> bool:
    """The Host header names loopback, [console] host, or one of [console] allowed_hosts (its port ignored)."""
    if not header:
        return False
    name = header.strip().lower()
    if name.startswith("["):
        name = name[:name.find("]") + 1] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.split(":")[0]
    name = name.removesuffix(".")
    bound = config.host.lower() if config.host not in ("0.0.0.0", "::", "") else None
    bound = f"[{bound}]" if bound and ":" in bound else bound
    return name in LOOPBACK or name == bound or name in config.allowed_hosts


class Sessions:
    """Signed cookies: base64(JSON {user, session id, csrf, expiry}) "." base64(HMAC). Log out revokes
    its session id until the session would have expired anyway."""

    def __init__(self, timeout: float, key: bytes | None = None) -> None:
        self.timeout = timeout
        self._key = key or secrets.token_bytes(32)
        self._revoked: dict[str, float] = {}  # session id -> its expiry

    def issue(self, user: str) -> str:
        payload = {"u": user, "s": secrets.token_urlsafe(12), "c": secrets.token_urlsafe(24),
                   "e": int(time.time() + self.timeout)}
        body = base64.urlsafe_b64encode(orjson.dumps(payload)).decode()
        return f"{body}.{self._sign(body)}"

    def read(self, cookie: str | None) -> Who | None:
        """The session's user, or None for no cookie, a forged, expired or revoked one."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, signature = cookie.split(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):  # bytes: any text compares
            return None
        try:
            payload = orjson.loads(base64.urlsafe_b64decode(body))
            user, session, csrf, expiry = payload["u"], payload["s"], payload["c"], float(payload["e"])
        except (ValueError, KeyError, TypeError):  # signed by us, so never; but a read must not raise
            return None
        if expiry < time.time() or session in self._revoked:
            return None
        return Who(str(user), "session", str(csrf), str(session))

    def revoke(self, who: Who) -> None:
        now = time.time()
        self._revoked = {s: e for s, e in self._revoked.items() if e > now}
        if who.session:
            self._revoked[who.session] = now + self.timeout

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def login_token() -> str:
    """The login form's CSRF token: in a cookie and in the form; a form posted from another site lacks the cookie."""
    return secrets.token_urlsafe(24)


def login_token_ok(cookie: str | None, field: str) -> bool:
    return cookie is not None and bool(cookie and field) and hmac.compare_digest(cookie.encode(), field.encode())


def bearer(config: ConsoleConfig, header: str | None) -> Who | None:
    """The token's holder, by its place in the list; None for no token or a wrong one."""
    if not header or not header.startswith("Bearer "):
        return None
    given = header.removeprefix("Bearer ").strip().encode()
    found = None
    for n, token in enumerate(config.tokens, 1):  # every token compared, in constant time each
        if hmac.compare_digest(given, token.encode()):
            found = Who(f"token {n}", "token")
    return found


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    """A refusal: JSON for the API, a short page for a browser."""
    if request.path.startswith("/api/"):
        headers = {"WWW-Authenticate": 'Bearer realm="hipcall-ingest console"'} if status == 401 else None
        return web.json_response({"error": message}, status=status, headers=headers)
    return web.Response(status=status, text=f"{status}: {message}\n", content_type="text/plain")


def access(config: ConsoleConfig, sessions: Sessions) -> Callable:
    """The middleware every request passes: the Host, log in, CSRF, readonly."""
    cookie = session_cookie(config)

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if not host_allowed(config, request.headers.get("Host")):
            return refuse(request, 400, "this console does not answer to that host name ([console] allowed_hosts)")
        if request.path.startswith(PUBLIC):
            return await handler(request)
        who = bearer(config, request.headers.get("Authorization"))
        if who is None and "Authorization" in request.headers and request.path.startswith("/api/"):
            return refuse(request, 401, "that bearer token is not one of [console] tokens")
        if who is None:
            who = sessions.read(request.cookies.get(cookie))
            if who is not None and who.name not in config.users:  # removed from the config since
                who = None
        if who is None:
            if request.path.startswith("/api/"):
                return refuse(request, 401, "log in, or send Authorization: Bearer TOKEN ([console] tokens)")
            # next= quoted whole: the page's own query (a filter) comes back with it, not cut at its first "&"
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/')}" if request.method == "GET" else "/login")
        if request.method == "POST":
            if who.via == "session" and not await _csrf_ok(request, who):
                return refuse(request, 403, "the form is stale or was not sent from the console (CSRF token); "
                                            "reload the page and try again")
            if config.readonly and request.path != "/logout":
                return refuse(request, 403, "the console is read-only ([console] readonly = true)")
        request[WHO] = who
        return await handler(request)

    return middleware


async def _csrf_ok(request: web.Request, who: Who) -> bool:
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.content_type == "application/x-www-form-urlencoded":
        given = str((await request.post()).get(CSRF_FIELD, ""))
    if not given or who.csrf is None:
        return False
    return hmac.compare_digest(given.encode(), who.csrf.encode())


def cookie_secure(request: web.Request) -> bool:
    """Mark cookies Secure when the browser came over HTTPS: directly, or through the proxy in front
    (X-Forwarded-Proto, which only a proxy on the same host can set: the console listens on 127.0.0.1)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
