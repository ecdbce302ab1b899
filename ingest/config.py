"""Configuration: built-in defaults, overlaid by one TOML file, overlaid by a few environment variables.

Parsed once, at start-up, into frozen dataclasses that are passed to whatever needs them. Any key
that is unknown, of the wrong type or out of range stops start-up with a ConfigError that names the
file and the key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .names import (
    CONSUMER_RE,
    EVENT_RE,
    consumer_queue,
    dead_letter_queue,
    delay_exchange,
    entry_exchange,
    format_duration,
    ledger_queue,
    reconcile_lock,
    requeue_exchange,
    retry_queue,
    tap_exchange,
)

DEFAULTS_NAME = "defaults.toml"


@dataclass(frozen=True)
class BrokerConfig:
    urls: tuple[str, ...]  # nodes of one cluster (or one node): connect to the first that answers
    exchange: str
    unrouted: str
    publish_timeout: float
    connect_timeout: float
    reconnect_min: float
    reconnect_max: float

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def safe_url(self) -> str:
        """Every URL, passwords replaced: for messages about the broker as a whole."""
        return ", ".join(redact_url(url) for url in self.urls)


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    path: str
    max_body_bytes: int
    shutdown_timeout: float
    idle_timeout: float
    body_timeout: float
    max_connections: int
    max_connections_per_client: int
    answer_timeout: float
    processes: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class SpoolConfig:
    enabled: bool
    dir: str
    max_bytes: int


@dataclass(frozen=True)
class HipcallConfig:
    api_url: str
    api_key: str = field(repr=False)  # from HIPCALL_API_KEY only; "" = reconcile does not run
    timeout: float


@dataclass(frozen=True)
class ReconcileConfig:
    enabled: bool
    interval: float
    lookback: float
    grace: float
    longest_call: float
    retention: float
    ledger: str
    rate_limit: int
    silent_min_calls: int
    silent_missing_percent: int
    metrics_host: str
    metrics_port: int


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[str, ...]
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class LoggingConfig:
    level: str
    format: str
    access: bool
    buffer_bytes: int  # lines waiting for a slow reader of stdout at most; past it they are dropped


@dataclass(frozen=True)
class RetryConfig:
    delays: tuple[float, ...]
    delivery_limit: int

    @property
    def attempts(self) -> int:
        return len(self.delays) + 1


@dataclass(frozen=True)
class WorkerConfig:
    grace_period: float
    metrics_host: str
    metrics_port: int
    concurrency: int


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool
    host: str
    port: int
    tokens: tuple[str, ...] = field(repr=False)  # API bearer tokens; also HIPCALL_CONSOLE_TOKENS
    users: Mapping[str, str] = field(repr=False)  # user name -> password hash (PASSWORD_HASH_RE)
    readonly: bool
    session_timeout: float
    allowed_hosts: tuple[str, ...]  # Host header names answered, besides loopback and `host`
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # whose X-Forwarded-For is believed
    max_read_bytes: int  # letters one read holds at most, in bytes (and its sweep's window)

    def check_access(self, where: str) -> None:
        """Access is off unless someone can log in or hold a token: a console nobody could use stops start-up."""
        if not (self.tokens or self.users):
            raise ConfigError(f"config error: {where}: neither console.users nor console.tokens is set (password "
                              f"hashes from `hipcall-ingest console hash-password`; tokens also in HIPCALL_CONSOLE_TOKENS): "
                              f"nobody could use the console (docs/console.md, Access)")


@dataclass(frozen=True)
class WallboardNumber:
    """[wallboard.numbers.N]: a number's name on the board and its own service-level threshold."""

    name: str
    service_level_seconds: int | None  # None: [wallboard] service_level_seconds


@dataclass(frozen=True)
class WallboardConfig:
    """[wallboard] (docs/wallboard.md): the console's live board over the postgres consumer's tables."""

    enabled: bool
    dsn: str = field(repr=False)  # resolved: the table's, else the one postgres consumer's options.dsn
    schema: str
    timezone: str  # an IANA zone name (zoneinfo): the day the figures count in
    service_level_seconds: int
    service_level_target: float  # 0-1: the board shows the service level against it
    longest_wait_amber: float  # seconds: the longest wait turns amber past this, red past the next
    longest_wait_red: float
    max_call_age: float  # a call without a call_hangup older than this is no longer live
    max_clients: int  # live (SSE) pages per console process
    numbers: Mapping[int, WallboardNumber]

    def threshold(self, number_id: int | None) -> int:
        """The service-level T for a number: its own, else the default."""
        own = self.numbers.get(number_id) if number_id is not None else None
        return own.service_level_seconds if own and own.service_level_seconds is not None else self.service_level_seconds


@dataclass(frozen=True)
class ConsumerConfig:
    name: str
    events: tuple[str, ...]
    handler: str
    concurrency: int
    enabled: bool
    retry: RetryConfig
    options: Mapping[str, Any]
    max_length: int = 0  # messages per queue of this consumer; 0 = no limit


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig
    http: HttpConfig
    spool: SpoolConfig
    auth: AuthConfig
    logging: LoggingConfig
    retry: RetryConfig
    worker: WorkerConfig
    consumers: tuple[ConsumerConfig, ...]
    source: str
    hipcall: HipcallConfig
    reconcile: ReconcileConfig
    console: ConsoleConfig
    wallboard: WallboardConfig

    @property
    def enabled_consumers(self) -> tuple[ConsumerConfig, ...]:
        return tuple(c for c in self.consumers if c.enabled)

    def consumer(self, name: str) -> ConsumerConfig | None:
        return next((c for c in self.consumers if c.name == name), None)


RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")  # served by the ingress itself; http.path cannot be one
_USERINFO_RE = re.compile(r"(//[^/@:]*):.*@")  # greedy: a password may hold "@" or "/"
_BARE_USERINFO_RE = re.compile(r"^(\s*[^/@:\s]*):.*@")  # no scheme: "user:password@host"


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages: any scheme, even a URL that
    does not parse (`amqp://u:p@h:notaport/`) or has no scheme at all (`u:p@host`)."""
    return (_USERINFO_RE if "//" in url else _BARE_USERINFO_RE).sub(r"\1:***@", url)


# --- value parsers: each takes (value, key) and returns the parsed value or raises _Bad ----------


class _Bad(Exception):
    """A value did not parse; carries what was expected. Turned into ConfigError with the source."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    if isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise _Bad('a duration string such as "250ms", "10s", "5m" or "2h"')


def parse_duration_arg(value: str, option: str) -> float:
    """A duration given on the command line; UsageError-worthy ConfigError otherwise."""
    try:
        return parse_duration(value)
    except _Bad as bad:
        raise ConfigError(f"{option}: expected {bad}, got {value!r}") from None


def _duration(low: float, high: float = 7 * 86400) -> Callable[[Any], float]:
    """A duration within [low, high]: a zero timeout or backoff is never what anyone meant."""
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if not low <= seconds <= high:
            raise _Bad(f"a duration from {_spell(low)} to {_spell(high)}")
        return seconds

    return parse


def _spell(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0s"


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("a string")
    return value


def _nonempty(value: Any) -> str:
    if not _string(value):
        raise _Bad("a non-empty string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Bad(f"a whole number from {low} to {high}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _Bad("one of " + ", ".join(f'"{c}"' for c in choices))
        return value

    return parse


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _Bad(what)
        return value

    return parse


def _list(item: Callable[[Any], Any], *, nonempty: bool = False) -> Callable[[Any], tuple]:
    def parse(value: Any) -> tuple:
        if not isinstance(value, list) or (nonempty and not value):
            raise _Bad("a non-empty list" if nonempty else "a list")
        try:
            return tuple(item(v) for v in value)
        except _Bad as bad:
            raise _Bad(f"a list of {bad}") from None

    return parse


# A console password hash, as `hipcall-ingest console hash-password` prints it:
# scrypt$N$r$p$SALT$KEY, SALT and KEY in base64, N a power of two (ingest/console/passwords.py).
PASSWORD_HASH_RE = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")
_USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _users(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Bad('a table of user = "password hash" (hipcall-ingest console hash-password prints one)')
    for user, hashed in value.items():
        if not _USER_RE.fullmatch(user):
            raise _Bad(f"user names of letters, digits and _.@- (at most 64), not {user[:64]!r}")
        if not isinstance(hashed, str) or not PASSWORD_HASH_RE.fullmatch(hashed):
            raise _Bad(f"for {user}: a password hash printed by `hipcall-ingest console hash-password`")
    return MappingProxyType(dict(value))


_HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]+\]")


def _host_name(value: Any) -> str:
    """A name browsers put in the Host header, without a port: console.example.com, 10.0.0.5, [::1]."""
    name = value.strip().lower() if isinstance(value, str) else ""
    if not _HOST_NAME_RE.fullmatch(name):
        raise _Bad('a host name without a port, such as "console.example.com", "10.0.0.5" or "[::1]"')
    return name


def _zone(value: Any) -> str:
    import zoneinfo

    if not isinstance(value, str) or not value:
        raise _Bad('an IANA time zone name such as "Europe/Istanbul" or "UTC"')
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Bad('an IANA time zone name such as "Europe/Istanbul" or "UTC" (zoneinfo has no such zone)') from None
    return value


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _Bad("a number from 0 to 1 (0.8 = 80 %)")
    return float(value)


def _numbers(value: Any) -> Mapping[int, WallboardNumber]:
    """[wallboard.numbers.N] tables: N the number_id Hipcall sends, keys name and service_level_seconds."""
    if not isinstance(value, dict):
        raise _Bad("a table of [wallboard.numbers.N] tables (N a number_id)")
    found: dict[int, WallboardNumber] = {}
    for key, table in value.items():
        if not key.isdigit() or not isinstance(table, dict) or set(table) - {"name", "service_level_seconds"}:
            raise _Bad(f'[wallboard.numbers.N] tables, N a number_id, with name = "..." and service_level_seconds = S '
                       f"(at {key!r})")
        name, seconds = table.get("name", key), table.get("service_level_seconds")
        if not isinstance(name, str) or (seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)
                                                                   or not 1 <= seconds <= 3600)):
            raise _Bad(f"for number {key}: name a string, service_level_seconds a whole number from 1 to 3600")
        found[int(key)] = WallboardNumber(name, seconds)
    return MappingProxyType(found)


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_string(value), strict=False)
    except ValueError:
        raise _Bad('a network such as "10.0.0.0/8" or "203.0.113.7"') from None


def _urls(value: Any) -> tuple[str, ...]:
    """One AMQP URL, or a non-empty list of them (the nodes of a cluster), each checked on its own."""
    urls = value if isinstance(value, list) and value else [value]
    for n, url in enumerate(urls, 1):
        try:
            good = isinstance(url, str) and urlsplit(url).scheme in ("amqp", "amqps")
            good = good and (urlsplit(url).port or 0) >= 0  # a port that is not a number raises
        except ValueError:  # "[::1" and the like
            good = False
        if not good:
            which = f" (entry {n} of {len(urls)} is not one)" if len(urls) > 1 else ""
            raise _Bad(f'an AMQP URL such as "amqp://user:password@host:5672/vhost", or a list of them{which}')
    return tuple(urls)


def _http_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise _Bad('an http(s) URL such as "https://use.hipcall.com.tr"')
    return value.rstrip("/")


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Bad('a URL path starting with "/"')
    if value.rstrip("/") in RESERVED_PATHS:
        raise _Bad(f"a path other than {', '.join(RESERVED_PATHS)} (the ingress's own endpoints)")
    return value


def _broker_name(value: Any) -> str:
    if _nonempty(value).startswith("amq."):
        raise _Bad('a name that does not start with "amq." (RabbitMQ reserves those for its own)')
    return value


def _token(value: Any) -> str:
    if not _nonempty(value).isprintable() or value != value.strip():
        raise _Bad("tokens of printable characters without spaces at either end")
    return value


_HANDLER_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_EVENT = _matching(EVENT_RE, "an event name matching ^[a-z][a-z0-9_.-]{0,63}$")
_TIMEOUT = _duration(0.1, 3600)
_DELAY = _duration(0.01)

_SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "broker": {
        "url": _urls,
        "exchange": _broker_name,
        "unrouted": _broker_name,
        "publish_timeout": _TIMEOUT,
        "connect_timeout": _TIMEOUT,
        "reconnect_min": _duration(0.01, 3600),
        "reconnect_max": _duration(0.01, 3600),
    },
    "http": {
        "host": _nonempty,
        "port": _integer(0, 65535),
        "path": _path,
        "max_body_bytes": _integer(1, 1 << 30),
        "shutdown_timeout": _duration(0, 3600),
        "idle_timeout": _TIMEOUT,
        "body_timeout": _TIMEOUT,
        "max_connections": _integer(1, 1_000_000),
        "max_connections_per_client": _integer(1, 1_000_000),
        "answer_timeout": _duration(0.3, 60),
        "processes": _integer(1, 64),
        "trusted_proxies": _list(_cidr),
    },
    "spool": {"enabled": _boolean, "dir": _nonempty, "max_bytes": _integer(1 << 20, 1 << 50)},
    "auth": {"tokens": _list(_token), "allow_ips": _list(_cidr)},
    "logging": {
        "level": _choice("debug", "info", "warning", "error"),
        "format": _choice("json", "console"),
        "access": _boolean,
        "buffer_bytes": _integer(4096, 1 << 30),
    },
    "retry": {"delays": _list(_DELAY), "delivery_limit": _integer(1, 1000)},
    "worker": {
        "grace_period": _duration(0, 86400),
        "metrics_host": _nonempty,
        "metrics_port": _integer(0, 65535),
        "concurrency": _integer(1, 10_000),
    },
    "hipcall": {"api_url": _http_url, "api_key": _string, "timeout": _TIMEOUT},
    "console": {
        "enabled": _boolean,
        "host": _nonempty,
        "port": _integer(1, 65535),
        "tokens": _list(_token),
        "users": _users,
        "readonly": _boolean,
        "session_timeout": _duration(60, 30 * 86400),
        "allowed_hosts": _list(_host_name),
        "trusted_proxies": _list(_cidr),
        "max_read_bytes": _integer(1 << 20, 1 << 40),
    },
    "wallboard": {
        "enabled": _boolean,
        "dsn": _string,
        "schema": _string,
        "timezone": _zone,
        "service_level_seconds": _integer(1, 3600),
        "service_level_target": _fraction,
        "longest_wait_amber": _duration(1, 86400),
        "longest_wait_red": _duration(1, 86400),
        "max_call_age": _duration(60, 7 * 86400),
        "max_clients": _integer(1, 10_000),
        "numbers": _numbers,
    },
    "reconcile": {
        "enabled": _boolean,
        "interval": _duration(1, 86400),
        "lookback": _duration(60, 30 * 86400),
        "grace": _duration(0, 86400),
        "longest_call": _duration(0, 86400),
        "retention": _duration(60, 365 * 86400),
        "ledger": _nonempty,
        "rate_limit": _integer(1, 100_000),
        "silent_min_calls": _integer(1, 1_000_000),
        "silent_missing_percent": _integer(1, 100),
        "metrics_host": _nonempty,
        "metrics_port": _integer(0, 65535),
    },
}

_CONSUMER_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "events": _list(_EVENT, nonempty=True),
    "handler": _matching(_HANDLER_RE, 'an import path "module:function" such as "mycompany.crm:on_event"'),
    "concurrency": _integer(1, 10_000),
    "enabled": _boolean,
    "max_length": _integer(0, 1_000_000_000),
}
_CONSUMER_REQUIRED = ("events", "handler")


# --- loading ---------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file at `path` (or $HIPCALL_CONFIG), then the environment overrides."""
    env = {} if env is None else env
    defaults = tomllib.loads(resources.files("ingest").joinpath(DEFAULTS_NAME).read_text("utf-8"))
    if not path and "HIPCALL_CONFIG" in env and not env["HIPCALL_CONFIG"].strip():
        raise ConfigError("config error: environment HIPCALL_CONFIG is set but empty; unset it or name a file")
    path = path or env.get("HIPCALL_CONFIG") or None
    source = str(path) if path else "built-in defaults"
    user: dict[str, Any] = {}
    if path:
        try:
            user = tomllib.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config error: {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config error: {path}: cannot read it ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path}: not valid TOML: {exc}") from None
    return _build(defaults, user, source, env)


def _build(defaults: dict, user: dict, source: str, env: Mapping[str, str]) -> Config:
    origin: dict[str, str] = {}  # dotted key -> where its value came from, when not the file

    def fail(key: str, expected: str, value: Any) -> ConfigError:
        where = origin.get(key, source)
        shown = "a value that is not shown (it is a secret)" if key in _SECRET_KEYS else _show(value)
        return ConfigError(f"config error: {where}: {key}: expected {expected}, got {shown}")

    for table in user:
        if table not in _SCHEMA and table != "consumers":
            raise ConfigError(f"config error: {source}: unknown table [{table}]")
    raw = {name: dict(defaults[name]) for name in _SCHEMA}
    for name in _SCHEMA:
        given = user.get(name, {})
        if not isinstance(given, dict):
            raise fail(name, "a table", given)
        for key, value in given.items():
            if key not in _SCHEMA[name]:
                raise ConfigError(f"config error: {source}: unknown key {name}.{key}")
            if f"{name}.{key}" in _ENV_ONLY:
                raise ConfigError(f"config error: {source}: {name}.{key} is never read from a file (it is a secret); "
                                  f"set the environment variable {_ENV_ONLY[f'{name}.{key}']} instead")
            raw[name][key] = value

    for var, (table, key, convert) in _ENV_OVERRIDES.items():
        if var in env:
            value = convert(env[var])
            if value in ("", []):  # set but empty: never silently "no tokens", "no URL"
                raise ConfigError(f"config error: environment {var} is set but empty ({table}.{key}); "
                                  f"unset it to use the file's value, or give it one")
            raw[table][key] = value
            origin[f"{table}.{key}"] = f"environment {var}"

    parsed: dict[str, dict[str, Any]] = {}
    for name, spec in _SCHEMA.items():
        parsed[name] = {}
        for key, parse in spec.items():
            try:
                parsed[name][key] = parse(raw[name][key])
            except _Bad as bad:
                raise fail(f"{name}.{key}", str(bad), raw[name][key]) from None

    broker = parsed["broker"]
    broker["urls"] = broker.pop("url")
    if broker["reconnect_max"] < broker["reconnect_min"]:
        raise fail("broker.reconnect_max", f"a duration of at least broker.reconnect_min ({_spell(broker['reconnect_min'])})",
                   raw["broker"]["reconnect_max"])
    rec = parsed["reconcile"]
    if rec["grace"] >= rec["lookback"]:
        raise fail("reconcile.grace", f"a duration shorter than reconcile.lookback ({_spell(rec['lookback'])})",
                   raw["reconcile"]["grace"])
    if rec["retention"] < rec["lookback"]:
        raise fail("reconcile.retention", f"a duration of at least reconcile.lookback ({_spell(rec['lookback'])})",
                   raw["reconcile"]["retention"])
    console = ConsoleConfig(**parsed["console"])
    if console.enabled:
        console.check_access(origin.get("console.tokens", source))
    retry = RetryConfig(**parsed["retry"])
    worker = WorkerConfig(**parsed["worker"])
    consumers = _consumers(defaults.get("consumers", {}), user.get("consumers", {}), source, retry, worker, fail)
    _check_names(broker["exchange"], broker["unrouted"], consumers, source)
    wallboard = _wallboard(parsed["wallboard"], consumers, source, fail, raw["wallboard"])
    return Config(
        broker=BrokerConfig(**parsed["broker"]),
        http=HttpConfig(**parsed["http"]),
        spool=SpoolConfig(**parsed["spool"]),
        auth=AuthConfig(**parsed["auth"]),
        logging=LoggingConfig(**parsed["logging"]),
        retry=retry,
        worker=worker,
        consumers=consumers,
        source=source,
        hipcall=HipcallConfig(**parsed["hipcall"]),
        reconcile=ReconcileConfig(**parsed["reconcile"]),
        console=console,
        wallboard=wallboard,
    )


POSTGRES_HANDLER = "workers.builtin:postgres"


def _wallboard(parsed: dict[str, Any], consumers: tuple[ConsumerConfig, ...], source: str, fail, raw: dict) -> WallboardConfig:
    """The board reads the postgres consumer's tables: its own dsn (and schema), else those of the one
    enabled postgres consumer; with none or several and no dsn, start-up stops saying which to name."""
    if parsed["longest_wait_red"] < parsed["longest_wait_amber"]:
        raise fail("wallboard.longest_wait_red", f"a duration of at least wallboard.longest_wait_amber "
                   f"({_spell(parsed['longest_wait_amber'])})", raw["longest_wait_red"])
    dsn, schema = parsed["dsn"], parsed["schema"]
    if parsed["enabled"] and not dsn:
        stores = [c for c in consumers if c.enabled and c.handler == POSTGRES_HANDLER]
        if len(stores) != 1:
            raise ConfigError(f"config error: {source}: wallboard.dsn: [wallboard] is enabled but names no dsn, and "
                              f"{len(stores)} enabled consumers use {POSTGRES_HANDLER} ({', '.join(c.name for c in stores) or 'none'}): "
                              f'name the database: dsn = "postgresql://..." (and schema)')
        dsn = str(stores[0].options.get("dsn", ""))
        schema = schema or str(stores[0].options.get("schema", "public"))
    if parsed["enabled"] and not dsn.startswith(("postgresql://", "postgres://")):
        raise fail("wallboard.dsn", "a postgresql:// URL", dsn)
    schema = schema or "public"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise fail("wallboard.schema", "a plain lower-case name (the postgres consumer's options.schema)", schema)
    return WallboardConfig(**{**parsed, "dsn": dsn, "schema": schema})


def _consumers(defaults: dict, user: Any, source: str, retry: RetryConfig, worker: WorkerConfig, fail) -> tuple:
    if not isinstance(user, dict):
        raise fail("consumers", "a table of [consumers.NAME] tables", user)
    merged = {name: dict(table) for name, table in defaults.items()}
    for name, table in user.items():
        if not isinstance(table, dict):
            raise fail(f"consumers.{name}", "a table", table)
        merged.setdefault(name, {}).update(table)

    result = []
    for name, table in merged.items():
        if not CONSUMER_RE.fullmatch(name):
            raise ConfigError(
                f"config error: {source}: [consumers.{name}]: a consumer name must match ^[a-z][a-z0-9_-]{{0,63}}$"
            )
        values: dict[str, Any] = {"concurrency": worker.concurrency, "enabled": True}
        for key, value in table.items():
            where = f"consumers.{name}.{key}"
            if key == "options":
                if not isinstance(value, dict):
                    raise fail(where, "a table", value)
                values["options"] = MappingProxyType(value)
            elif key == "retry":
                values["retry"] = _consumer_retry(value, retry, where, fail)
            elif key in _CONSUMER_SCHEMA:
                try:
                    values[key] = _CONSUMER_SCHEMA[key](value)
                except _Bad as bad:
                    raise fail(where, str(bad), value) from None
            else:
                raise ConfigError(f"config error: {source}: unknown key {where}")
        for key in _CONSUMER_REQUIRED:
            if key not in values:
                raise ConfigError(f"config error: {source}: consumers.{name}.{key} is required")
        values.setdefault("retry", retry)
        values.setdefault("options", MappingProxyType({}))
        result.append(ConsumerConfig(name=name, **values))
    return tuple(result)


def _consumer_retry(value: Any, base: RetryConfig, where: str, fail) -> RetryConfig:
    if not isinstance(value, dict):
        raise fail(where, "a table such as { delays = [\"5s\", \"1m\"] }", value)
    fields: dict[str, Any] = {"delays": base.delays, "delivery_limit": base.delivery_limit}
    for key, item in value.items():
        if key not in _SCHEMA["retry"]:
            raise fail(f"{where}.{key}", "one of the keys delays, delivery_limit", key)
        try:
            fields[key] = _SCHEMA["retry"][key](item)
        except _Bad as bad:
            raise fail(f"{where}.{key}", str(bad), item) from None
    return RetryConfig(**fields)


def _check_names(exchange: str, unrouted: str, consumers: tuple[ConsumerConfig, ...], source: str) -> None:
    """Two things that would get one name on the broker (event "x.dlq" beside event "x", event
    "retry.10s" beside a 10s retry tier, consumer "hipcall" with event "unrouted") stop start-up."""
    def claim(owners: dict[str, str], name: str, what: str) -> None:
        if owners.setdefault(name, what) != what:
            raise ConfigError(f"config error: {source}: {what} and {owners[name]} would both be named {name!r} "
                              f"on the broker; rename an event or a consumer")

    exchanges: dict[str, str] = {}  # exchanges and queues are separate namespaces on the broker
    for name, what in ((exchange, "broker.exchange"), (unrouted, "broker.unrouted"),
                       (entry_exchange(exchange), "the entry exchange"), (tap_exchange(exchange), "the tap exchange"),
                       (delay_exchange(exchange), "the delay exchange"), (requeue_exchange(exchange), "the requeue exchange")):
        claim(exchanges, name, what)
    queues: dict[str, str] = {unrouted: "the unrouted queue", ledger_queue(exchange): "reconcile's ledger queue",
                              reconcile_lock(exchange): "reconcile's lock queue"}
    for consumer in consumers:
        for seconds in consumer.retry.delays:
            claim(queues, retry_queue(consumer.name, seconds), f"the {format_duration(seconds)} retry tier of consumer {consumer.name!r}")
        for event in consumer.events:
            claim(queues, consumer_queue(consumer.name, event), f"the queue of consumer {consumer.name!r} for event {event!r}")
            claim(queues, dead_letter_queue(consumer.name, event), f"the DLQ of consumer {consumer.name!r} for event {event!r}")


def _url_list(value: str) -> Any:
    """One URL, or several separated by commas (a comma followed by the next URL's scheme: any scheme,
    so that a misspelt one is an entry of its own that fails its check, not part of the one before)."""
    urls = [u.strip() for u in re.split(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)", value.strip()) if u.strip()]
    return urls[0] if len(urls) == 1 else urls


def _tokens(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _port(value: str) -> Any:
    return int(value) if value.strip().isdigit() else value


_SECRET_KEYS = {"auth.tokens", "hipcall.api_key", "console.tokens", "console.users"}  # wallboard.dsn: redact_url
_ENV_ONLY = {"hipcall.api_key": "HIPCALL_API_KEY"}  # secrets that a file in a repository must not hold

_ENV_OVERRIDES: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "HIPCALL_AMQP_URL": ("broker", "url", _url_list),
    "HIPCALL_HTTP_PORT": ("http", "port", _port),
    "HIPCALL_TOKENS": ("auth", "tokens", _tokens),
    "HIPCALL_API_KEY": ("hipcall", "api_key", str.strip),
    "HIPCALL_CONSOLE_TOKENS": ("console", "tokens", _tokens),
    "HIPCALL_CONSOLE_HOST": ("console", "host", str.strip),  # a container's console listens on 0.0.0.0
    "HIPCALL_CONSOLE_PORT": ("console", "port", _port),
}


def _show(value: Any) -> str:
    """A value for an error message, never long and never a secret in full."""
    text = repr(_redacted(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _redacted(value: Any) -> Any:
    """Every string in a value, however nested, with a URL's password replaced."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value
