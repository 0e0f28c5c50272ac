"""Batch.to with one merged copy, host-side batch checks, the device prefetcher (CPU parts; the CUDA parts
are in test_nosync.py)."""

from __future__ import annotations

import threading
from dataclasses import fields, replace

import pytest
import torch

from recfm.errors import DataError
from recfm.foundation.data.batch import Batch, TargetGroup, TokenGroup
from recfm.foundation.data.device import DevicePrefetcher, check_batch, in_background, merged_copy, pack, target_rows

kjt_module = pytest.importorskip("torchrec.sparse.jagged_tensor", reason="torchrec builds the batch's KJTs")
KeyedJaggedTensor = kjt_module.KeyedJaggedTensor


def _kjt(n: int, gen: torch.Generator) -> KeyedJaggedTensor:
    """Two keys, one id per token, host-side metadata (as the collator builds it)."""
    return KeyedJaggedTensor(
        keys=["item_id", "cat_id"], values=torch.randint(0, 100, (2 * n,), generator=gen),
        lengths=torch.ones(2 * n, dtype=torch.int32), stride=n, length_per_key=[n, n], offset_per_key=[0, n, 2 * n],
    )


def host_batch(seed: int = 0) -> Batch:
    """3 samples: (H, R, T feed, T coupon) = (3, 1, 1, 1), (0, 0, 0, 1), (2, 1, 2, 0); 2 sequence kinds."""
    gen = torch.Generator().manual_seed(seed)
    types = [0, 0, 0, 1, 2, 2, 2, 0, 0, 1, 2, 2]
    group = [0, 1, 0, 2, 3, 4, 4, 1, 0, 2, 3, 3]
    n = len(types)
    clicks, orders = torch.tensor([0, 2, 8, 9]), torch.tensor([1, 3, 7])
    feed, coupon = torch.tensor([4, 10, 11]), torch.tensor([5, 6])
    numeric = torch.randn(2, 3, generator=gen).t()  # non-contiguous [3, 2]
    return Batch(
        offsets=torch.tensor([0, 6, 7, 12]),
        token_type=torch.tensor(types, dtype=torch.int8),
        timestamps=torch.arange(n, dtype=torch.int64) * 10,
        group=torch.tensor(group),
        user_id=torch.tensor([7, 8, 9]),
        events={
            "clicks": TokenGroup("clicks", clicks, _kjt(4, gen), torch.zeros(4, 0), torch.zeros(4, 0)),
            "orders": TokenGroup("orders", orders, None, numeric, torch.zeros(3, 0), numeric_names=("a", "b")),
        },
        targets={
            "feed": TargetGroup("feed", feed, _kjt(3, gen), torch.zeros(3, 0), torch.randn(3, 5, generator=gen),
                                sample_index=torch.tensor([0, 2, 2]), user_id=torch.tensor([7, 9, 9]),
                                exposure_id=torch.tensor([1, 2, 3]), labels={"click": torch.tensor([1.0, 0.0, 1.0])},
                                oracle={"click": torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)}),
            "coupon": TargetGroup("coupon", coupon, None, torch.zeros(2, 0), torch.zeros(2, 0),
                                  sample_index=torch.tensor([0, 1]), user_id=torch.tensor([7, 8]),
                                  exposure_id=torch.tensor([4, 5]), labels={"redeem": torch.tensor([0.0, 1.0])}),
        },
        scenarios=("feed", "coupon"),
        sequences=("clicks", "orders"),
        max_len=6,
        num_targets=5,
    )


def assert_same(a, b, path="batch"):
    """Recursively: same types, tensor dtypes/shapes/values, KJT contents and host metadata."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, KeyedJaggedTensor):
        assert b.keys() == a.keys() and b.stride() == a.stride(), path
        assert b.length_per_key() == a.length_per_key() and b.offset_per_key() == a.offset_per_key(), path
        assert_same(a.values(), b.values(), path + ".values")
        assert_same(a.lengths(), b.lengths(), path + ".lengths")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (Batch, TokenGroup)):
        assert type(a) is type(b), path
        for f in fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, path


def _all_tensors(batch: Batch) -> list[torch.Tensor]:
    out = []
    batch._map(lambda t: out.append(t) or t, lambda kjt: out.extend([kjt.values(), kjt.lengths()]) or kjt)
    return out


def test_merged_copy_round_trip_is_equal_and_one_buffer():
    host = host_batch()
    moved = host.to("cpu", merged=True)
    assert_same(host, moved)
    storages = {t.untyped_storage().data_ptr() for t in _all_tensors(moved)}
    assert len(storages) == 1  # every tensor (KJT values/lengths too) is a view of one buffer
    assert storages.isdisjoint(t.untyped_storage().data_ptr() for t in _all_tensors(host))
    assert_same(host, merged_copy(moved, "cpu"))  # views (with odd offsets) pack again


def test_plain_to_stays_per_tensor_and_default_merges_only_to_cuda():
    host = host_batch()
    assert_same(host, host.to("cpu"))
    assert_same(host, host.to("cpu", merged=False))
    empty = replace(host, events={}, targets={}, scenarios=(), sequences=(), offsets=torch.tensor([0]), max_len=0,
                    token_type=torch.zeros(0, dtype=torch.int8), timestamps=torch.zeros(0, dtype=torch.int64),
                    group=torch.zeros(0, dtype=torch.int64), user_id=torch.zeros(0, dtype=torch.int64), num_targets=0)
    assert_same(empty, empty.to("cpu", merged=True))


def test_check_batch_names_the_fault():
    check_batch(host_batch())
    with pytest.raises(DataError, match="end at N=12"):
        check_batch(replace(host_batch(), offsets=torch.tensor([0, 6, 7, 11])))
    with pytest.raises(DataError, match="max_len=5"):
        check_batch(replace(host_batch(), max_len=5))
    with pytest.raises(DataError, match=r"group ids must be in \[0, 5\)"):
        check_batch(replace(host_batch(), group=torch.full((12,), 5)))
    with pytest.raises(DataError, match="token_type"):
        check_batch(replace(host_batch(), token_type=torch.full((12,), 3, dtype=torch.int8)))
    bad = host_batch()
    bad.targets["feed"].token_index = torch.tensor([4, 10, 12])
    with pytest.raises(DataError, match=r"targets\['feed'\].token_index"):
        check_batch(bad)


def test_target_rows_and_cpu_prefetcher():
    host = host_batch()
    assert target_rows(host).tolist() == [4, 10, 11, 5, 6]
    assert sorted(target_rows(host).tolist()) == torch.nonzero(host.token_type == 2).squeeze(1).tolist()
    batches = [host_batch(0), host_batch(1)]
    got = list(DevicePrefetcher(batches, "cpu"))
    assert len(got) == 2
    for a, b in zip(batches, got):
        assert_same(a, b)
    with pytest.raises(DataError, match="max_len"):
        list(DevicePrefetcher([replace(host, max_len=1)], "cpu"))
    assert len(list(DevicePrefetcher([replace(host, max_len=1)], "cpu", validate=False))) == 1


def test_pack_then_move_is_the_merged_copy():
    # what the prefetcher's background thread does (pack, host only) and then its training thread (one transfer)
    host = host_batch(2)
    packed = pack(host, pin=False)
    assert packed.host.dtype == torch.uint8 and packed.host.dim() == 1
    moved = packed.to("cpu")
    assert_same(host, moved)
    assert len({t.untyped_storage().data_ptr() for t in _all_tensors(moved)}) == 1


def test_in_background_keeps_order_runs_elsewhere_and_raises_in_place():
    threads, pulled = set(), []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise DataError(f"item {i} is bad")
            pulled.append(i)
            yield i

    def square(i):
        threads.add(threading.get_ident())
        if i == 7:
            raise DataError("seven")
        return i * i

    assert list(in_background(items(5), square, ahead=2)) == [0, 1, 4, 9, 16]
    assert threads and threading.get_ident() not in threads  # fn (and the iteration) ran on the worker thread
    pulled.clear()
    gen = in_background(items(100), square, ahead=3)
    assert next(gen) == 0
    assert len(pulled) <= 1 + 3  # never more than `ahead` items beyond the one asked for
    gen.close()
    stopped = len(pulled)
    assert stopped <= 1 + 3  # closing stops the worker
    got = []
    with pytest.raises(DataError, match="item 3 is bad"):  # the source's error, at its item
        for x in in_background(items(10, fail_at=3), square, ahead=2):
            got.append(x)
    assert got == [0, 1, 4]
    got = []
    with pytest.raises(DataError, match="seven"):  # fn's error, at its item
        for x in in_background(items(10), square, ahead=4):
            got.append(x)
    assert got == [i * i for i in range(7)]
    with pytest.raises(ValueError, match="ahead"):
        DevicePrefetcher([], "cpu", ahead=0)
