"""TokenDataset over a real OUTPUT: splits, equal counts, shuffle, resume, columns, flat sequences."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.dataset import FLAT_LAYOUT, TokenDataset
from pipeline.output import Output, OutputError
from schemas import build_rows, column_to_numpy
from schemas.tensors import tensor_type
from tests.readers import build_output

SIZES = [7, 3, 9, 5, 6]  # 30 rows in row groups of 3: windows and slices cross row groups and shards
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return build_output(tmp_path_factory.mktemp("dataset"), SIZES)["output"]


@pytest.fixture(scope="module")
def table(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(f"{out}/shards/{s:05d}.parquet") for s in range(len(SIZES)))


def keys(items) -> list[str]:
    return [k for item in items for k in (item["key"] if isinstance(item["key"], list) else [item["key"]])]


def ranks_by_loader(out, world: int, workers: int, batch_size: int = 4, **kw) -> list[list[dict]]:
    return [list(DataLoader(TokenDataset(out, rank=r, world_size=world, **kw), batch_size=batch_size,
                            num_workers=workers)) for r in range(world)]


def test_two_ranks_two_workers_read_every_row_once(out, table):
    batches = ranks_by_loader(out, world=2, workers=2, shuffle=True, seed=3, buffer_size=4)
    got = [keys(b) for b in batches]
    assert sorted(got[0] + got[1]) == sorted(table.column("key").to_pylist())
    assert not set(got[0]) & set(got[1])
    assert abs(len(got[0]) - len(got[1])) <= 1


@pytest.mark.parametrize("equal,per_rank", [("pad", 8), ("truncate", 7)])
def test_equal_counts_and_batches_per_rank(out, table, equal, per_rank):
    batches = ranks_by_loader(out, world=4, workers=2, batch_size=3, shuffle=True, seed=5, equal=equal)
    got = [keys(b) for b in batches]
    assert [len(g) for g in got] == [per_rank] * 4
    assert len({len(b) for b in batches}) == 1  # the same number of batches on every rank: none waits
    flat = [k for g in got for k in g]
    every = set(table.column("key").to_pylist())
    if equal == "pad":  # every row, and the two extra ones repeated from the start of the sequence
        assert set(flat) == every and sum(c - 1 for c in collections.Counter(flat).values()) == 2
    else:  # no row twice, two rows left out this epoch
        assert len(set(flat)) == 28 and set(flat) <= every
    assert TokenDataset(out, rank=0, world_size=4, equal=equal).rank_samples() == per_rank


def test_same_seed_same_order_other_epoch_or_seed_other_order(out):
    def order(seed, epoch):
        ds = TokenDataset(out, ["key"], shuffle=True, seed=seed, buffer_size=8)
        ds.set_epoch(epoch)
        return keys(ds)

    a = order(1, 0)
    assert a == order(1, 0)
    assert sorted(a) == sorted(order(1, 1)) and a != order(1, 1)
    assert a != order(2, 0)
    assert keys(TokenDataset(out, ["key"])) == sorted(a)  # no shuffle: stem order, file order


@pytest.mark.parametrize("stop", [0, 1, 5, 13, 29, 30])
def test_resume_mid_epoch_yields_exactly_the_rest(out, stop):
    ds = TokenDataset(out, ["key"], shuffle=True, seed=7, buffer_size=4)
    ds.set_epoch(2)
    full = keys(ds)
    it = iter(ds)
    head = [next(it)["key"] for _ in range(stop)]
    state = ds.state_dict()

    class Counting(TokenDataset):
        def _read(self, piece):
            self.rows_read = getattr(self, "rows_read", 0) + piece.stop - piece.start
            return super()._read(piece)

    fresh = Counting(out, ["key"], shuffle=True, seed=7, buffer_size=4)
    fresh.load_state_dict(state)
    rest = keys(fresh)
    assert head + rest == full
    # only the window holding the stop is read again (fewer than buffer_size rows), not the epoch so far
    assert getattr(fresh, "rows_read", 0) - len(rest) < 4


def test_stateful_dataloader_resumes_with_two_workers(out):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        ds = TokenDataset(out, ["key"], shuffle=True, seed=11, buffer_size=4, rank=1, world_size=2)
        return StatefulDataLoader(ds, batch_size=2, num_workers=2)

    full = keys(loader())
    first = loader()
    it = iter(first)
    head = keys(next(it) for _ in range(3))
    state = first.state_dict()
    del it
    second = loader()
    second.load_state_dict(state)
    assert head + keys(second) == full


def test_state_of_another_layout_is_refused(out):
    state = TokenDataset(out, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="another layout.*world_size 2 vs 4"):
        TokenDataset(out, rank=0, world_size=4).load_state_dict(state)


def test_columns_equal_what_pyarrow_reads(out, table):
    ds = TokenDataset(out, ["key", "pixel_ids", "semantic_pooled", "width", "shard", "text"])
    rows = {r["key"]: r for r in ds}
    ids, pooled = column_to_numpy(table, "pixel_ids"), column_to_numpy(table, "semantic_pooled")
    assert len(rows) == table.num_rows
    for i, key in enumerate(table.column("key").to_pylist()):
        r = rows[key]
        assert r["pixel_ids"].dtype == torch.int64 and r["pixel_ids"].shape == ids.shape[1:]
        np.testing.assert_array_equal(r["pixel_ids"].numpy(), ids[i])
        assert r["semantic_pooled"].dtype == torch.float32
        np.testing.assert_array_equal(r["semantic_pooled"].numpy(), pooled[i].astype(np.float32))
        assert int(r["width"]) == table.column("width")[i].as_py()
        assert r["shard"] == table.column("shard")[i].as_py() and r["text"] == table.column("text")[i].as_py()
    assert set(next(iter(TokenDataset(out)))) == {"key", "pixel_ids", "semantic_pooled"}  # default: key + tensors
    with pytest.raises(OutputError, match="no column 'semantic_ids'"):
        TokenDataset(out, ["key", "semantic_ids"])


def test_a_file_list_reads_like_the_output(out, table):
    files = [f.url for f in Output(out).shards()][::-1]
    ds = TokenDataset(files, ["key"], rank=1, world_size=2)
    assert sorted(keys(ds) + keys(TokenDataset(files, ["key"], rank=0, world_size=2))) == \
        sorted(table.column("key").to_pylist())


def test_uncommitted_files_are_not_read(tmp_path):
    info = build_output(tmp_path, [4, 4])
    (tmp_path / "out" / "_manifest" / "00001.json").unlink()  # shards/00001.parquet stays, uncommitted
    assert len(keys(TokenDataset(info["output"], ["key"]))) == 4


def _manual_flat(pixel: np.ndarray, semantic: np.ndarray | None, k: int, s: int | None) -> list[int]:
    c, h, w = pixel.shape
    seq = []
    if semantic is not None:
        n, g = semantic.shape
        seq += [c * k + j * s + int(semantic[i, j]) for i in range(n) for j in range(g)]
    return seq + [ci * k + int(pixel[ci, y, x]) for y in range(h) for x in range(w) for ci in range(c)]


def test_flat_sequence_follows_the_documented_layout(out, table):
    k = 1024 // 4  # wintok-tiny: vocab 1024 over 4 codebooks, from the run fingerprint
    ds = TokenDataset(out, ["key", "pixel_ids"], flat=True)
    ids = column_to_numpy(table, "pixel_ids")
    for i, r in enumerate(ds):
        assert set(r) == {"key", "tokens"} and r["tokens"].dtype == torch.int64
        assert r["tokens"].tolist() == _manual_flat(ids[i], None, k, None)
    assert "c * K + pixel_ids[c, y, x]" in FLAT_LAYOUT and "P + g * S" in FLAT_LAYOUT


def test_flat_with_semantic_ids_from_a_file_list(tmp_path):
    schema = pa.schema([pa.field("key", pa.string()),
                        pa.field("pixel_ids", tensor_type(pa.uint16(), (2, 3, 3))),
                        pa.field("semantic_ids", tensor_type(pa.uint16(), (4, 2)))])
    rng = np.random.default_rng(0)
    pixel, semantic = rng.integers(0, 16, (5, 2, 3, 3)), rng.integers(0, 100, (5, 4, 2))
    pq.write_table(pa.Table.from_batches([build_rows(schema, {"key": list("abcde"), "pixel_ids": pixel,
                                                              "semantic_ids": semantic})]), tmp_path / "a.parquet")
    ds = TokenDataset([str(tmp_path / "a.parquet")], ["key", "pixel_ids", "semantic_ids"], flat=True,
                      codebook_size=16, semantic_codebook_size=100)
    got = list(ds)
    assert [r["key"] for r in got] == list("abcde")
    for i, r in enumerate(got):
        assert r["tokens"].tolist() == _manual_flat(pixel[i], semantic[i], 16, 100)
    plain = next(iter(TokenDataset([str(tmp_path / "a.parquet")])))
    assert plain["semantic_ids"].dtype == torch.int64 and plain["semantic_ids"].shape == (4, 2)
    with pytest.raises(OutputError, match="semantic_codebook_size"):
        TokenDataset([str(tmp_path / "a.parquet")], flat=True, codebook_size=16)


def test_readme_snippet_runs(out):
    text = README.read_text()
    section = text[text.index("## Reading the output for training"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {"OUTPUT": out, "EPOCHS": 2}
    exec(compile(snippet, "README snippet", "exec"), scope)
    assert scope["seen"] == 2 * 30


def test_batches_hold_the_same_rows_in_the_same_order_and_resume(out, table):
    def ds(**kw):
        return TokenDataset(out, ["key", "pixel_ids"], shuffle=True, seed=4, buffer_size=4, **kw)

    rows = list(ds())
    batches = list(DataLoader(ds(batch_size=7), batch_size=None))
    assert [len(b["key"]) for b in batches] == [7, 7, 7, 7, 2]
    assert keys(batches) == [r["key"] for r in rows]
    np.testing.assert_array_equal(torch.cat([b["pixel_ids"] for b in batches]).numpy(),
                                  torch.stack([r["pixel_ids"] for r in rows]).numpy())
    first = ds(batch_size=7)
    it = iter(first)
    head = [next(it), next(it)]
    second = ds(batch_size=7)
    second.load_state_dict(first.state_dict())
    assert keys(head) + keys(second) == keys(batches)


def test_reader_benchmark_runs_on_a_small_output(tmp_path):
    from benchmarks.reader import build, run

    res = run(build(str(tmp_path / "out"), shards=2, rows=300), rounds=1)  # each case asserts its row count
    assert res["_rows"] == 600 and all(v > 0 for v in res.values())


def _ddp_rank(rank: int, world: int, port: int, out: str, result: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = TokenDataset(out, ["key"], shuffle=True, seed=9, equal="pad")  # rank and world from torch.distributed
        with open(f"{result}.{rank}", "w") as f:
            json.dump({"keys": keys(ds), "state": ds.state_dict()}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_come_from_torch_distributed(out, table, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, out, str(tmp_path / "r")), nprocs=2)
    got = [json.load(open(tmp_path / f"r.{r}")) for r in range(2)]
    assert [g["state"]["rank"] for g in got] == [0, 1] and got[0]["state"]["world_size"] == 2
    assert [len(g["keys"]) for g in got] == [15, 15]
    assert sorted(got[0]["keys"] + got[1]["keys"]) == sorted(table.column("key").to_pylist())


def test_wrong_sources_are_one_line_errors(tmp_path):
    with pytest.raises(OutputError, match="holds no wintok run"):
        TokenDataset(str(tmp_path))
    with pytest.raises(OutputError, match="not found"):
        TokenDataset([str(tmp_path / "absent.parquet")])
    with pytest.raises(OutputError, match="no shard files"):
        TokenDataset([])
