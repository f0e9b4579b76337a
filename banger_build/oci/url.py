"""A file named by URL, downloaded into the blob cache (a recipe's ``url`` inputs).

Nix's fetchurl: the recipe gives the sha256, so the bytes are checked as they
are written (``BlobCache.put_stream``: a temp file, hashed, renamed only when
it is those bytes) and a URL that serves others fails naming both digests.
The request goes through a ``transport.Endpoint``, with the registry client's
bounds: connect and read timeouts, the response headers within a deadline,
the low-speed rule, retries of transient failures. No credentials are sent.
Plain HTTP only to loopback hosts and ``--insecure-registry`` hosts, after
redirects too. A body past ``limit`` bytes is refused (by its Content-Length
before it is read). Failures are ``wire.WireError``s; ``source`` names the URL.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from banger_build.errors import Reason
from banger_build.oci.auth import Auth
from banger_build.oci.blobs import BlobCache, BlobMismatch
from banger_build.oci.options import RegistryOptions, plain_http_allowed
from banger_build.oci.reference import Digest
from banger_build.oci.transport import Endpoint
from banger_build.oci.wire import WireError, content_length, origin_of

#: (short name, bytes done, bytes in all or None), as ``remote.Progress``
Progress = Callable[[str, int, int | None], None]


def _plain_http(url: str, options: RegistryOptions) -> WireError | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and not plain_http_allowed(parts.netloc, options.insecure):
        return WireError(
            f"refusing plain HTTP to {origin_of(url)}: only loopback hosts and insecure "
            f"registries may use http:// (--insecure-registry {parts.netloc} allows it)",
            reason=Reason.INSECURE,
        )
    return None


_DENIED = (Reason.AUTH, "access denied (no credentials are sent for a URL)")
_STATUS = {404: (Reason.NOT_FOUND, "not found"), 401: _DENIED, 403: _DENIED}


def _status(resp: requests.Response) -> WireError:
    unexpected = (Reason.HTTP_STATUS, f"unexpected response {resp.reason or ''}".strip())
    reason, message = _STATUS.get(resp.status_code, unexpected)
    return WireError(message, reason=reason, status=resp.status_code)


def fetch_url(
    url: str,
    digest: Digest,
    cache: BlobCache,
    options: RegistryOptions,
    limit: int,
    progress: Progress | None = None,
) -> Path:
    """Download ``url`` into ``cache`` as ``digest`` (verified) and return its path."""
    refused = _plain_http(url, options)
    if refused is not None:
        raise refused
    netloc = urllib.parse.urlsplit(url).netloc
    ep = Endpoint(origin_of(url), netloc, Auth(options), options)
    name = digest.short

    def handle(resp: requests.Response) -> Path:
        refused = _plain_http(resp.url, options)  # where redirects led
        if refused is not None:
            raise refused
        if resp.status_code != 200:
            raise _status(resp)
        length = content_length(resp)
        if length is not None and length > limit:
            raise WireError(
                f"the file is {length} bytes, more than the limit of {limit} bytes",
                reason=Reason.TOO_LARGE,
            )

        def chunks() -> Iterator[bytes]:
            done = 0
            if progress is not None:
                progress(name, 0, length)
            for chunk in ep.body(resp):
                done += len(chunk)
                if done > limit:
                    raise WireError(
                        f"the file is larger than the limit of {limit} bytes",
                        reason=Reason.TOO_LARGE,
                    )
                if progress is not None:
                    progress(name, done, length)
                yield chunk

        try:
            return cache.put_stream(digest, chunks())
        except BlobMismatch as exc:
            raise WireError(
                f"served {exc.size} bytes with sha256 {exc.actual.hex}, but the recipe pins "
                f"sha256 {digest.hex}",
                reason=Reason.SHA256_MISMATCH,
            ) from None

    # identity: the bytes as stored, never decoded from a Content-Encoding on the way
    headers = {"Accept-Encoding": "identity"}
    return ep.exchange("GET", url, handle, headers=headers, authenticate=False)
