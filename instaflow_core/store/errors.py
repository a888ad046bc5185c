"""Storage errors translated into one clear line (wrong keys, unreachable endpoint, missing bucket)."""

from __future__ import annotations

from instaflow_core.errors import InstaflowError, StorageError


class StoreNotFoundError(StorageError, FileNotFoundError):
    """Nothing at that URI (catchable as FileNotFoundError too)."""


# Fragments of messages from botocore, s3fs and Lance's Rust object store, mapped to one clear line.
_AUTH_MARKERS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "status: 403", "Forbidden")


_UNREACHABLE_MARKERS = (
    "Could not connect to the endpoint",
    "kind: Connect",
    "Connection refused",
    "connection refused",
    "dns error",
    "ConnectTimeout",
    "Connect timeout",
    "EndpointConnectionError",
)


_NO_BUCKET_MARKERS = ("NoSuchBucket", "bucket does not exist", "The specified bucket does not exist")


def translate_error(
    err: BaseException,
    what: str,
    *,
    endpoint: str | None = None,
    bucket: str | None = None,
    key_envs: tuple[str, str] | None = None,
) -> StorageError | None:
    """A StorageError with one clear line for a storage failure, or None if `err` is not one.

    The line is built here from the kind of failure, never copied from `err` (whose text can be long).
    """
    if isinstance(err, InstaflowError):
        return None
    text = f"{type(err).__name__}: {err}"
    where = endpoint or "S3"
    keys = f" (keys from ${key_envs[0]} / ${key_envs[1]})" if key_envs else ""
    if "InvalidAccessKeyId" in text:
        return StorageError(f"{what}: S3 at {where} does not know the access key{keys} (InvalidAccessKeyId)")
    if "SignatureDoesNotMatch" in text:
        return StorageError(f"{what}: S3 at {where} rejected the secret key{keys} (SignatureDoesNotMatch)")
    if any(m in text for m in _NO_BUCKET_MARKERS):
        return StorageError(f"{what}: bucket {bucket or '?'!r} does not exist at {where}")
    if any(m in text for m in _UNREACHABLE_MARKERS):
        return StorageError(f"{what}: cannot reach the S3 endpoint {where}; is the server running?")
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return StorageError(f"{what}: no S3 credentials found{keys}")
    if any(m in text for m in _AUTH_MARKERS) or (isinstance(err, PermissionError) and endpoint):
        return StorageError(f"{what}: access denied by S3 at {where}{keys}")
    if isinstance(err, PermissionError):
        return StorageError(f"{what}: permission denied ({err.filename or err})")
    return None


# ------------------------------------------------------------------------------------------- transient
# Lance's Rust object store reports every failure as text (`OSError` / `ValueError("LanceError(IO): ...")`),
# so for Lance this is the one place that reads messages: an outage or throttling, never a wrong key or a
# missing object (those are permanent and listed first).
_PERMANENT_MARKERS = (
    *_AUTH_MARKERS,
    *_NO_BUCKET_MARKERS,
    "NoSuchKey",
    "Not found",
    "not found",
    "InvalidBucketName",
)
_TRANSIENT_MARKERS = (
    *_UNREACHABLE_MARKERS,
    "error sending request",
    "connection reset",
    "Connection reset",
    "connection closed",
    "Connection aborted",
    "broken pipe",
    "Broken pipe",
    "timed out",
    "operation timed out",
    "SlowDown",
    "Throttl",
    "ServiceUnavailable",
    "Service Unavailable",
    "InternalError",
    "status: 500",
    "status: 502",
    "status: 503",
    "status: 504",
    "Retryable commit conflict",
    "RequestTimeout",
)


def is_transient_message(text: str) -> bool:
    """Does an error's text describe an outage, a timeout, throttling or a retryable conflict (not a wrong
    key, a missing bucket or object)? Used for Lance and object_store errors, which carry no type."""
    if any(m in text for m in _PERMANENT_MARKERS):
        return False
    return any(m in text for m in _TRANSIENT_MARKERS)
