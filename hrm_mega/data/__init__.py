"""Data: shard format (shards.py), record reading and puzzle/text decoding (decode.py, collate.py), partition
planning (partition.py), shard reading and the evaluation pass (reader.py), loader worker processes
(workers.py), and the training stream of puzzle or text samples (stream.py).

Exports are resolved lazily, so that `import hrm_mega.data.shards` (used by the shard builders) does not
import torch and webdataset.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CorruptDataWarning": "hrm_mega.data.decode",
    "SampleSpec": "hrm_mega.data.decode",
    "decode_puzzle": "hrm_mega.data.decode",
    "decode_text": "hrm_mega.data.decode",
    "decoder_for": "hrm_mega.data.decode",
    "DataFormatError": "hrm_mega.data.shards",
    "ShardWriter": "hrm_mega.data.shards",
    "read_manifest": "hrm_mega.data.shards",
    "write_manifest": "hrm_mega.data.shards",
    "iterate_split": "hrm_mega.data.reader",
    "SampleStream": "hrm_mega.data.stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrm_mega.data' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
