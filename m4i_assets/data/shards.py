"""Record shards of one model version's signals: shard `index` of `count` holds a contiguous run of the
version's records (in `record_id` order), cut at batch boundaries. A signal computed shard by shard is then the
same batches through the same model as computed whole, so its numbers do not depend on the shard count
(tests/test_shards.py); the shards only decide which worker computes which batches."""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np


class Shard(NamedTuple):
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    @property
    def key(self) -> str:
        """The shard's partition key: its index."""
        return str(self.index)

    def file_name(self, model_version: str) -> str:
        """Its signal file: `<version>.parquet` when the version is one shard, else `<version>.shard-i-of-n.parquet`."""
        if self.count == 1:
            return f"{model_version}.parquet"
        return f"{model_version}.shard-{self.index}-of-{self.count}.parquet"

    def rows(self, n_rows: int, batch_size: int) -> slice:
        """The rows of `n_rows` (ordered) this shard holds: its share of the batches of `batch_size`, contiguous."""
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}")
        batches = np.array_split(np.arange(-(-n_rows // batch_size)), self.count)[self.index]
        if not len(batches):
            return slice(n_rows, n_rows)
        return slice(int(batches[0]) * batch_size, min(n_rows, (int(batches[-1]) + 1) * batch_size))


WHOLE = Shard(0, 1)
_SHARD_FILE = re.compile(r"^(?P<version>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.parquet$")


def shard_keys(count: int) -> list[str]:
    """The partition keys of `count` shards."""
    if count < 1:
        raise ValueError(f"record_shards must be at least 1, got {count}")
    return [Shard(i, count).key for i in range(count)]


def shard_of_file(file_name: str) -> tuple[str, Shard] | None:
    """(version, shard) of a sharded signal file's name; None for any other name."""
    match = _SHARD_FILE.match(file_name)
    if match is None:
        return None
    return match["version"], Shard(int(match["index"]), int(match["count"]))
