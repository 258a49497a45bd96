"""Shards from anywhere: `data.shard_url` names where a dataset's shards are read from, with the manifest
still read from data.path. The template's {split} and {name} are the shard's split and file name:

    pipe:cat /mnt/datasets/sudoku/{split}/{name}            any command that writes the shard to stdout
    pipe:aws s3 cp s3://bucket/sudoku/{split}/{name} -
    https://data.example.com/sudoku/{split}/{name}
    gs://bucket/sudoku/{split}/{name}                        webdataset's other schemes (gopen)

A remote shard is fetched whole into a temporary file on local disk (memory stays bounded by the read
buffer), checked against the sha256 in the manifest, and read from there. A failed or damaged fetch is
tried again, `data.read_retries` times with exponential back-off; then the shard counts as unreadable,
which corrupt_policy turns into skipped samples or a one-line error naming the URL. HTTP(S) is fetched
with urllib under a timeout (a server that stalls cannot hang the run); other schemes go through
webdataset's gopen.
"""

from __future__ import annotations

import hashlib
import http.client
import tempfile
import time
import urllib.error
import urllib.request
from typing import IO

from hrm_mega.config.sections import SHARD_URL_SCHEMES

TIMEOUT_S = 60.0
BACKOFF_S = 0.5


class ShardFetchError(OSError):
    """A remote shard that could not be fetched intact; the message is one line naming the URL."""


def is_remote(location: str) -> bool:
    return location.startswith(SHARD_URL_SCHEMES)


def fetch_shard(url: str, sha256: str, retries: int) -> IO[bytes]:
    """The shard at `url` in a temporary file (read position 0), matching `sha256` when one is given."""
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (returned open; the reader closes it)
        try:
            digest = hashlib.sha256()
            with _open(url) as stream:
                while block := stream.read(1 << 20):
                    digest.update(block)
                    spool.write(block)
            if sha256 and digest.hexdigest() != sha256:
                raise ShardFetchError("its sha256 differs from manifest.json")
            spool.seek(0)
            return spool
        except (OSError, ValueError, http.client.HTTPException) as e:
            spool.close()
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ShardFetchError(f"{url}: not fetched intact in {retries + 1} attempts ({reason})")


def _open(url: str) -> IO[bytes]:
    if url.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (the user's own URL)
        except urllib.error.URLError as e:
            raise ShardFetchError(str(e.reason)) from None
    from webdataset.gopen import gopen

    return gopen(url, "rb")
