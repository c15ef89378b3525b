"""Training-side reader: a torch `IterableDataset` over an OUTPUT's committed shards.

    from pipeline.dataset import TokenDataset
    ds = TokenDataset("s3://bucket/tokens", shuffle=True, seed=0, equal="pad")
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=4)

How an epoch is laid out (all of it a pure function of seed, epoch, rank, world size, worker
and worker count, so every rank and worker computes it alone, and a resume knows where it was):

1. The committed shards (from `_manifest/`, with their row counts) are put in an order: by
   stem, or with `shuffle` a permutation seeded by (seed, epoch). Their rows, concatenated in
   that order, are the epoch's *sequence* of N rows.
2. Each DDP rank takes one contiguous slice of the sequence, and each DataLoader worker one
   contiguous slice of its rank's slice; the slices do not overlap and cover the sequence.
   Without `equal` the ranks' counts differ by at most one row. `equal="truncate"` gives every
   rank floor(N / world) rows (the last N mod world rows of the sequence are left out this
   epoch: with `shuffle` they are other rows each epoch); `equal="pad"` gives every rank
   ceil(N / world) rows, the missing ones repeated from the start of the sequence. With either,
   every rank also splits its rows over its workers the same way, so every rank makes the same
   number of batches and none waits at the end of the epoch.
3. A worker reads its slice in *windows* of `buffer_size` rows (only the row groups a window
   touches are read); with `shuffle` each window's rows are permuted (seeded by seed, epoch and
   the window's place): shard order + a bounded shuffle buffer.

`state_dict()` is {epoch, rows yielded so far by this worker}; `load_state_dict` makes the next
iteration start at the window holding that position, reading only that window's row groups and
skipping the rows of it already yielded, so nothing read before is replayed. With torchdata's
`StatefulDataLoader` each worker's state is kept and restored by the loader.

Samples are dicts: `key` (str), tensor columns as torch tensors (id columns such as
`pixel_ids` (C, H, W) and `semantic_ids` (N, G) as int64, float columns as float32), integer
columns as 0-d int64 tensors, text columns as str. With `flat=True` the token columns become one
int64 sequence `tokens` (layout: FLAT_LAYOUT).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas import column_to_numpy
from schemas.tokens import tensor_shapes

from .io import StorageOptions
from .output import Output, OutputError, ShardFile, open_parquet

log = logging.getLogger("wintok")

FLAT_LAYOUT = """Flat sequence (`TokenDataset(flat=True)`), one int64 vector per image:

    tokens = [ semantic ids ; pixel ids ]                    (semantic part only with `semantic_ids`)
    semantic: for n in 0..N-1, for g in 0..G-1:  P + g * S + semantic_ids[n, g]
    pixel:    for y in 0..H-1, x in 0..W-1 (raster order), for c in 0..C-1:  c * K + pixel_ids[c, y, x]

K = pixel codebook size (vocab_size / num_codebooks of the model), C = number of pixel codebooks,
P = C * K (the pixel vocabulary comes first, ids 0..P-1), S = semantic codebook size; the whole
vocabulary is P + G * S ids. Length: N * G + H * W * C."""

EQUAL_MODES = (None, "truncate", "pad")
ID_COLUMNS = ("pixel_ids", "semantic_ids")


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of shard `file` (an index into the dataset's shard list)."""

    file: int
    start: int
    stop: int


def _split(lo: int, hi: int, parts: int, i: int) -> tuple[int, int]:
    n = hi - lo
    return lo + i * n // parts, lo + (i + 1) * n // parts


class TokenDataset(IterableDataset):
    """Committed rows of an OUTPUT (or of a list of shard files) as dicts of tensors.

    `source`: an OUTPUT URL (local or any fsspec URL; `storage` holds its options) or a list of
    shard file URLs. `columns`: the columns to read (default: key and every tensor column).
    `rank`/`world_size`: default from torch.distributed when it is initialised, else 0 / 1.
    `equal`: None, "truncate" or "pad" (see the module doc). `flat`: one `tokens` sequence per
    image (FLAT_LAYOUT); `codebook_size` defaults to the run fingerprint's model config,
    `semantic_codebook_size` defaults to the fingerprint's `semantic_codebook.k`. `batch_size`: yield
    batches (dicts of stacked tensors and lists) of that many rows, the last one of a worker's
    slice shorter; use with `DataLoader(ds, batch_size=None)`: several times faster than the
    DataLoader collating single rows (benchmarks/RESULTS.md), same rows in the same order.
    """

    def __init__(self, source: str | Sequence[str], columns: Sequence[str] | None = None, *,
                 storage: StorageOptions | None = None, shuffle: bool = False, seed: int = 0,
                 buffer_size: int = 2048, rank: int | None = None, world_size: int | None = None,
                 equal: str | None = None, flat: bool = False, codebook_size: int | None = None,
                 semantic_codebook_size: int | None = None, batch_size: int | None = None) -> None:
        super().__init__()
        if equal not in EQUAL_MODES:
            raise ValueError(f"equal must be one of {EQUAL_MODES}, not {equal!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, not {buffer_size}")
        out = Output(source, storage) if isinstance(source, str) else Output.of_files(list(source), storage)
        self.files: list[ShardFile] = out.shards()  # listed once, here; the workers get the list
        schema = out.schema()
        self.opts = storage
        self.shapes = tensor_shapes(schema)
        available = schema.names
        if columns is None:
            columns = ["key", *self.shapes]
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise OutputError(f"no column {', '.join(map(repr, unknown))} in the shards; they have: "
                              f"{', '.join(available)}")
        self.columns = list(dict.fromkeys(columns))
        self.shuffle, self.seed, self.buffer_size, self.equal = shuffle, seed, buffer_size, equal
        self._rank, self._world = rank, world_size
        self.flat, self.batch_size = flat, batch_size
        self.codebook_size = self.semantic_codebook_size = None
        if flat:
            self._init_flat(out, codebook_size, semantic_codebook_size)
        self.epoch = 0
        self._yielded = 0               # rows yielded by this (worker's) iterator in this epoch
        self._resume: dict[str, Any] | None = None
        self._open: OrderedDict[Any, Any] = OrderedDict()  # per-process caches, not pickled

    def _init_flat(self, out: Output, codebook_size: int | None, semantic_codebook_size: int | None) -> None:
        if "pixel_ids" not in self.columns:
            raise OutputError("flat=True needs the pixel_ids column")
        if codebook_size is None:
            cfg = (out.fingerprint().get("model") or {}).get("config") or {}
            if not cfg.get("vocab_size") or not cfg.get("num_codebooks"):
                raise OutputError("the run fingerprint names no model config: pass codebook_size=")
            codebook_size = int(cfg["vocab_size"]) // int(cfg["num_codebooks"])
        if "semantic_ids" in self.columns and not semantic_codebook_size:
            semantic_codebook_size = (out.fingerprint().get("semantic_codebook") or {}).get("k")
            if not semantic_codebook_size:
                raise OutputError("the rows have semantic_ids and the fingerprint names no semantic codebook: "
                                  "pass semantic_codebook_size= for flat=True")
        self.codebook_size, self.semantic_codebook_size = codebook_size, semantic_codebook_size

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ layout of an epoch
    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (in every rank) for a new shuffle; a pending resume keeps its epoch.

        As with DistributedSampler, DataLoader workers see it only when they start, so do not use
        `persistent_workers=True` with a shuffle that should change per epoch."""
        self.epoch = epoch

    def _dist(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            rank, world = self._rank or 0, self._world or 1
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        return rank, world

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order

    def _rank_range(self, total: int, rank: int, world: int) -> tuple[int, int]:
        if self.equal == "truncate":
            n = total // world
        elif self.equal == "pad":
            n = -(-total // world)
        else:
            return _split(0, total, world, rank)
        return rank * n, (rank + 1) * n

    def rank_samples(self, rank: int | None = None, world_size: int | None = None) -> int:
        """Rows one rank yields per epoch (all its workers together)."""
        r, w = self._dist()
        lo, hi = self._rank_range(sum(f.rows for f in self.files), r if rank is None else rank,
                                  w if world_size is None else world_size)
        return hi - lo

    def _worker_range(self, epoch: int) -> tuple[int, int]:
        """This worker's slice [lo, hi) of the epoch's sequence (indices past N wrap: pad)."""
        rank, world = self._dist()
        worker, workers = self._worker()
        lo, hi = self._rank_range(sum(f.rows for f in self.files), rank, world)
        return _split(lo, hi, workers, worker)

    def _pieces(self, order: list[int], lo: int, hi: int) -> list[_Piece]:
        """Rows lo..hi-1 of the sequence as pieces of shards (wrapping around for pad)."""
        total = sum(self.files[i].rows for i in order)
        pieces: list[_Piece] = []
        if total == 0:
            return pieces
        pos = lo
        while pos < hi:
            seq, offset = pos % total, 0
            for i in order:
                rows = self.files[i].rows
                if offset + rows > seq:
                    take = min(rows - (seq - offset), hi - pos)
                    pieces.append(_Piece(i, seq - offset, seq - offset + take))
                    pos += take
                    break
                offset += rows
        return pieces

    # ------------------------------------------------------------------ reading
    def _row_groups(self, file: int) -> tuple[Any, np.ndarray]:
        key = ("file", file)
        if key not in self._open:
            pf = open_parquet(self.files[file].url, self.opts)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            if starts[-1] != self.files[file].rows:
                raise OutputError(f"{self.files[file].stem}: the file holds {starts[-1]} rows, its manifest "
                                  f"{self.files[file].rows}: run `wintok verify` on the OUTPUT")
            self._cache(key, (pf, starts), limit=4)
        return self._open[key]

    def _cache(self, key: Any, value: Any, limit: int) -> None:
        self._open[key] = value
        kind = [k for k in self._open if k[0] == key[0]]
        for old in kind[:-limit]:
            del self._open[old]

    def _read(self, piece: _Piece) -> pa.Table:
        pf, starts = self._row_groups(piece.file)
        first = int(np.searchsorted(starts, piece.start, side="right")) - 1
        last = int(np.searchsorted(starts, piece.stop, side="left"))
        parts = []
        for g in range(first, last):
            key = ("rg", piece.file, g)
            if key not in self._open:
                self._cache(key, pf.read_row_group(g, columns=self.columns), limit=2)
            table = self._open[key]
            a, b = max(piece.start, starts[g]) - starts[g], min(piece.stop, starts[g + 1]) - starts[g]
            parts.append(table.slice(int(a), int(b - a)))
        return pa.concat_tables(parts)

    def _window(self, pieces: list[_Piece], start: int, stop: int) -> list[_Piece]:
        """The pieces of rows start..stop-1 of a worker's slice."""
        out, pos = [], 0
        for p in pieces:
            n = p.stop - p.start
            a, b = max(start, pos), min(stop, pos + n)
            if a < b:
                out.append(_Piece(p.file, p.start + a - pos, p.start + b - pos))
            pos += n
        return out

    def _columns(self, table: pa.Table) -> dict[str, Any]:
        """A window's columns as numpy arrays (tensor and integer columns) or lists (the rest).

        Gathering and flattening run in numpy, and torch only wraps the results: torch's
        intra-op threads made a 64-row gather 30x slower on a busy 2-vCPU machine."""
        cols: dict[str, Any] = {}
        for name in self.columns:
            if name in self.shapes:
                arr = column_to_numpy(table, name)
                cols[name] = arr.astype(np.int64 if np.issubdtype(arr.dtype, np.integer) else np.float32)
            elif pa.types.is_integer(table.schema.field(name).type):
                cols[name] = table.column(name).to_numpy().astype(np.int64)
            else:
                cols[name] = table.column(name).to_pylist()
        if self.flat:
            cols["tokens"] = self._flatten(cols.pop("pixel_ids"), cols.pop("semantic_ids", None))
        return cols

    def _flatten(self, pixel: np.ndarray, semantic: np.ndarray | None) -> np.ndarray:
        """FLAT_LAYOUT for a window: pixel (n, C, H, W), semantic (n, N, G) -> (n, L) int64."""
        n, c = pixel.shape[:2]
        k = self.codebook_size
        seq = (pixel + np.arange(c).reshape(1, c, 1, 1) * k).transpose(0, 2, 3, 1).reshape(n, -1)
        if semantic is None:
            return np.ascontiguousarray(seq)
        g, s = semantic.shape[-1], self.semantic_codebook_size
        sem = (semantic + c * k + np.arange(g).reshape(1, 1, g) * s).reshape(n, -1)
        return np.concatenate([sem, seq], axis=1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A new pass (the state counts from here), or the rest of a restored one."""
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume else self.epoch
        self._yielded = skip = resume["yielded"] if resume else 0
        return self._rows(epoch, skip)

    def _rows(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        lo, hi = self._worker_range(epoch)
        pieces = self._pieces(self._order(epoch), lo, hi)
        b, waiting = self.buffer_size, 0
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        for w0 in range(skip // b * b, hi - lo, b):
            table = pa.concat_tables([self._read(p) for p in self._window(pieces, w0, min(w0 + b, hi - lo))])
            n = table.num_rows
            perm = np.arange(n)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, lo + w0]).permutation(n)
            cols, idx = self._columns(table), perm[max(0, skip - w0):]
            if self.batch_size is None:
                for j in idx.tolist():
                    row = {k: torch.as_tensor(v[j]) if isinstance(v, np.ndarray) else v[j] for k, v in cols.items()}
                    self._yielded += 1
                    yield row
                continue
            pending.append((cols, idx))
            waiting += len(idx)
            while waiting >= self.batch_size:
                waiting -= self.batch_size
                yield self._batch(pending, self.batch_size)
        if waiting:
            yield self._batch(pending, waiting)
        self._open.clear()

    def _batch(self, pending: list[tuple[dict[str, Any], np.ndarray]], n: int) -> dict[str, Any]:
        """The next n rows of `pending` (window columns, row indices) as one batch."""
        parts = []
        while n:
            cols, idx = pending[0]
            parts.append((cols, idx[:n]))
            n -= len(parts[-1][1])
            if len(idx) > len(parts[-1][1]):
                pending[0] = (cols, idx[len(parts[-1][1]):])
            else:
                pending.pop(0)
        out: dict[str, Any] = {}
        for k, v in parts[0][0].items():
            if isinstance(v, np.ndarray):
                out[k] = torch.from_numpy(np.concatenate([np.take(c[k], i, axis=0) for c, i in parts]))
            else:
                out[k] = [c[k][j] for c, i in parts for j in i.tolist()]
        self._yielded += len(out[k])
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where this (worker's) iterator is: restore with `load_state_dict` before iterating."""
        if self._resume is not None:  # restored but not iterated yet: still that place
            return dict(self._resume)
        rank, world = self._dist()
        worker, workers = self._worker()
        return {"epoch": self.epoch, "yielded": self._yielded, "seed": self.seed, "rank": rank,
                "world_size": world, "worker": worker, "num_workers": workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration yields exactly the rows that the saved one had not yielded yet."""
        rank, world = self._dist()
        worker, workers = self._worker()
        here = {"seed": self.seed, "rank": rank, "world_size": world, "worker": worker, "num_workers": workers}
        diff = {k: (state.get(k), v) for k, v in here.items() if state.get(k) != v}
        if diff:
            raise ValueError("the saved reader state is of another layout (saved, now): "
                             + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
        self.epoch = int(state["epoch"])
        self._resume = {**state, "epoch": self.epoch, "yielded": int(state["yielded"])}
