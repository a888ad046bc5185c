"""An S3 endpoint in the config must be an http(s) URL with a host: checked when the config loads."""

from __future__ import annotations


def check_endpoint(url: str | None) -> str | None:
    """An S3 endpoint must be an http(s) URL with a host (and a numeric port, if any): ValueError otherwise."""
    from urllib.parse import urlsplit

    if not url:
        return None
    hint = "use http(s)://host[:port], e.g. http://127.0.0.1:8333"
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError on a non-numeric / out-of-range port
    except ValueError as err:
        raise ValueError(f"{url!r} is not a URL ({err}): {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host: {hint}")
    if port == 0 or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r}: {hint} (no credentials, query or fragment)")
    return url.strip().rstrip("/")
