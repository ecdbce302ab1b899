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
    """The broker did not store a message; a subclass says how, where the caller acts on it. Raised as
    it is: the channel or connection closed before or under the publish."""


class PublishRefused(PublishFailed):
    """The broker nacked it: a queue full at its max_length (overflow reject-publish), or a resource it lacks."""


class PublishReturned(PublishFailed):
    """The broker returned it (mandatory): no queue is bound for its routing key."""


class PublishTimeout(PublishFailed):
    """No confirm within the publish timeout (the broker blocked, slow, or gone without a word)."""


class StartupError(HipcallError):
    """The process cannot start as configured (a port in use): exit 1 with one line."""


class CannotListen(StartupError):
    """The ingress cannot listen on http.host:http.port (in use, or not an address of this machine)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} (http.host, http.port): {reason}")


class HandlerImportError(HipcallError):
    """A consumer's handler cannot be imported or is not callable."""


class SpoolFull(HipcallError):
    """The spool has no room (spool.max_bytes) or cannot be written: the webhook gets 503."""


class ApiError(HipcallError):
    """Hipcall's API did not give an answer we can use; the pass stops and the next one tries again."""


class ApiUnauthorized(ApiError):
    """401/403: the key in HIPCALL_API_KEY is wrong or lacks access."""


class ApiRefused(ApiError):
    """Hipcall's API refused what was asked with a 4xx (not 401, 403 or 429): asking again would not help."""


class TaskUncertain(ApiError):
    """A POST to Hipcall's API got no answer: what it asked for may or may not exist now."""


class NotADeadLetterQueue(HipcallError):
    """The named queue is not one of the configured consumers' DLQs."""


class QueueMissing(HipcallError):
    """The DLQ does not exist on the broker (its consumer's topology was never declared)."""


class CutShort(HipcallError):
    """A sweep saw fewer letters than the DLQ held: another reader took the rest meanwhile."""


class CannotWrite(HipcallError):
    """`dlq export` could not write its file."""


class NodeError(HipcallError):
    """A project-local RabbitMQ node (ingest/localnode.py) could not be started or stopped; the message
    says what to do."""


class UsageError(HipcallError):
    """A command-line argument names something that does not exist (exit 2)."""


class BadRequest(HipcallError):
    """A console request that cannot be done as asked (a filter that is not a time, a purge whose
    count is stale): answered 400 or 409 with this message."""

    status = 400


class StaleCount(BadRequest):
    """A purge confirmed for a count the DLQ no longer has."""

    status = 409


class WallboardUnavailable(HipcallError):
    """The wallboard's database did not answer (or has no tables yet): its pages and API answer 503."""
