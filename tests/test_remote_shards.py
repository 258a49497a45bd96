"""Shards from anywhere (data.shard_url): `pipe:` commands and HTTP give the rows of local paths; a server
that drops the connection mid-shard is retried, then skipped and counted or fatal in one line."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_tiny_sudoku

from hrm_mega.config import ConfigError, load_config
from hrm_mega.data import DataFormatError, SampleStream, iterate_split
from hrm_mega.resources import recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_sudoku(tmp_path_factory.mktemp("remote"))


class DroppingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory, except that shard-000001.tar of the train split stops after half its bytes
    (the full Content-Length announced), as a server that drops the connection does."""

    requests: list[str] = []
    drop = False

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if not (type(self).drop and self.path.endswith("train/shard-000001.tar")):
            return super().do_GET()
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def server(data) -> Iterator[str]:
    handler = functools.partial(DroppingHandler, directory=str(data))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def rows(data: Path, steps: int = 10, **kw) -> list[tuple[int, tuple]]:
    stream = SampleStream(
        data, seed=3, global_batch=8, partitions=2, shuffle_buffer=8, corrupt_policy="fail", **kw
    )
    out = []
    for _ in range(steps):
        batch = stream.take(range(8))
        out += [(int(i), tuple(x.tolist())) for i, x in zip(batch["sample_id"], batch["inputs"])]
    stream.close()
    return out


def test_pipe_and_http_shards_give_the_rows_of_local_paths(data, server):
    local = rows(data)
    assert len({sid for sid, _ in local}) == 80  # more than one epoch of some partitions: shards re-read
    assert rows(data, shard_url=f"pipe:cat {data}/{{split}}/{{name}}") == local
    assert rows(data, shard_url="pipe:cat " + str(data) + "/{split}/{name}", num_workers=1) == local
    DroppingHandler.drop = False
    assert rows(data, shard_url=server + "/{split}/{name}") == local
    served = list(
        iterate_split(data, "test", batch_size=8, corrupt_policy="fail", shard_url=server + "/{split}/{name}")
    )
    expected = list(iterate_split(data, "test", batch_size=8, corrupt_policy="fail"))
    assert [b["sample_id"].tolist() for b in served] == [b["sample_id"].tolist() for b in expected]
    assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(served, expected))


def test_a_dropped_connection_is_retried_then_fatal_or_skipped(data, server):
    url = server + "/{split}/{name}"
    DroppingHandler.requests.clear()
    DroppingHandler.drop = True
    with pytest.raises(DataFormatError) as error:
        for _ in iterate_split(
            data, "train", batch_size=8, corrupt_policy="fail", shard_url=url, read_retries=2
        ):
            pass
    message = str(error.value)
    assert (
        message.startswith(f"{server}/train/shard-000001.tar: not fetched intact in 3 attempts (")
        and "\n" not in message
    )
    assert DroppingHandler.requests.count("/train/shard-000001.tar") == 3
    stream = SampleStream(data, seed=0, global_batch=8, partitions=2, loop=False, corrupt_policy="skip",
                          shard_url=url, read_retries=0)  # fmt: skip
    with pytest.warns(UserWarning, match="shard-000001.tar: not fetched intact in 1 attempts"):
        while not stream.exhausted:
            stream.take(range(8))
    progress = stream.progress
    assert (
        progress["skipped_shards"] == 1
        and progress["skipped_samples"] == 12
        and progress["samples"] == 96 - 12
    )
    stream.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://bucket/{split}/{name}", "data.shard_url='s3://bucket/{split}/{name}': unknown scheme 's3'"),
        ("pipe:cat /x/{split}/shard.tar", "has no {name} (the shard's file name) in it"),
    ],
)
def test_a_bad_shard_url_is_one_line_before_training(url, message):
    with pytest.raises(ConfigError) as error:
        load_config(recipe("puzzle/hrm_sudoku_tiny.yaml"), [f"data.shard_url={url}"])
    assert message in str(error.value) and "\n" not in str(error.value)
