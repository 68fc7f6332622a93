"""Typed errors with a machine-readable code.

The code travels into the job record (``error.code``) and to the CLI's exit message, so
callers can branch on it; the message says what was wrong and, where it applies, which field.
"""

from __future__ import annotations


class RefineryError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInput(RefineryError):
    """The job's parameters break the contract (raised at submit time where possible)."""

    code = "invalid_input"


class InvalidImage(InvalidInput):
    """Bytes that are not a decodable image, or one outside the size limits."""

    code = "invalid_image"


class InputNotFound(InvalidInput):
    """A refine-only input that does not exist in S3."""

    code = "input_not_found"


class CallbackRefused(InvalidInput):
    """A callback URL that points at a private, loopback or link-local address."""

    code = "callback_url_refused"


class JobNotFound(RefineryError):
    code = "job_not_found"


class StorageUnavailable(RefineryError):
    """S3 could not be reached or refused the request."""

    code = "storage_unavailable"


class QueueFull(RefineryError):
    """Admission control: the queue is deeper than the configured limit; retry later."""

    code = "queue_full"


class BrokerUnavailable(RefineryError):
    """Redis (broker and job records) could not be reached, or a submitted job was not
    confirmed by the replicas in time; retryable, and safe to retry with the same
    idempotency key."""

    code = "broker_unavailable"


class UnknownRefiner(InvalidInput):
    """A refiner name, version or channel the registry does not hold."""

    code = "unknown_refiner"


class RefinerConflict(InvalidInput):
    """Publishing other bytes under a version that exists: versions are immutable."""

    code = "refiner_conflict"


class RefinerUnavailable(RefineryError):
    """A refiner version that failed to download, verify or load: it is never served."""

    code = "refiner_unavailable"


class ModelUnavailable(RefineryError):
    """A worker could not load its model's weights (not cached, no hub access)."""

    code = "model_unavailable"
