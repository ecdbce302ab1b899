"""The errors a user of hipcall-ingest can see, each named for what went wrong."""


class HipcallError(Exception):
    """Base of every error hipcall-ingest raises on purpose; its message says what to do."""


class ConfigError(HipcallError):
    """The configuration file or environment has a key that is wrong: start-up stops (exit 2)."""


class TopologyError(HipcallError):
    """The broker holds an exchange or queue that conflicts with what the config asks for."""


class BrokerUnavailable(HipcallError):
    """The broker cannot be reached or did not confirm in time."""


class PublishFailed(BrokerUnavailable):
    """The broker did not store a message: returned, refused, no confirm in time, or channel gone."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind  # "returned", "refused" (nack: a full queue, say), "timeout", "closed", "other"


class StartupError(HipcallError):
    """The process cannot start as configured (a port in use): exit 1 with one line."""


class CannotListen(StartupError):
    """The ingress cannot listen on http.host:http.port (in use, or not an address of this machine)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} (http.host, http.port): {reason}")


class HandlerImportError(HipcallError):
    """A consumer's handler cannot be imported or is not callable."""


class UsageError(HipcallError):
    """A command-line argument names something that does not exist (exit 2)."""
