"""Tests of the smart cache: its schedule followed, no-stall path, ranks, budget, failures,
resume, the lock (the schedule alone: test_cache_schedule.py)."""

import json
import logging
import os
import sys
import threading
import time

import numpy as np
import pytest

from tf_medseg.cache import (
    CacheBudgetError,
    CachePrefixError,
    SmartCache,
    item_nbytes,
)
from tf_medseg.cache.sources import SourceOptions, make_source

SIDE = 4


def make_items(n):
    return [
        {
            "case": f"case_{i:03d}",
            "image": f"/data/imagesTr/case_{i:03d}.nii.gz",
            "label": f"/data/labelsTr/case_{i:03d}.nii.gz",
        }
        for i in range(n)
    ]


def index_of(item):
    return int(item["case"].split("_")[1])


def index_prefix(item):
    """A prefix whose output encodes the item's index, shaped like a cached item."""
    i = index_of(item)
    label = np.zeros((SIDE,) * 3, np.uint8)
    label[1:3, 1:3, 1:3] = 1
    return {
        "case": item["case"],
        "image": np.full((SIDE,) * 3 + (1,), i, np.float32),
        "label": label,
        "fg_indices": np.argwhere(label > 0).astype(np.int32),
        "bg_indices": np.argwhere(label == 0).astype(np.int32),
    }


def run_epochs(cache, epochs):
    """Cached index lists and epoch orders over ``epochs`` epochs."""
    contents, orders = [], []
    for _ in range(epochs):
        entries = cache.epoch_items()
        orders.append([i for i, _ in entries])
        contents.append(cache.cached_indices())
        cache.end_epoch()
    return contents, orders


def test_full_cache_holds_every_item_and_reshuffles_each_epoch():
    with SmartCache(make_items(7), index_prefix, replace_rate=0.0, progress=False) as cache:
        assert cache.cache_num == 7 and cache.replace_num == 0
        contents, orders = run_epochs(cache, 4)
        assert all(sorted(c) == list(range(7)) for c in contents)
        assert all(sorted(o) == list(range(7)) for o in orders)
        assert len({tuple(o) for o in orders}) > 1
        for index, item in cache.epoch_items():
            np.testing.assert_array_equal(item["image"], np.full((SIDE,) * 3 + (1,), index))
            assert item["image"].ctypes.data % 64 == 0
        assert cache.stats()["swaps"] == 0


def test_replacement_schedule_follows_the_stream_and_evicts_the_oldest():
    cache = SmartCache(
        make_items(10),
        index_prefix,
        cache_num=4,
        replace_rate=0.5,
        shuffle=False,
        wait_for_replacements=True,
        progress=False,
    )
    with cache:
        assert cache.replace_num == 2  # ceil(4 * 0.5)
        contents, _ = run_epochs(cache, 6)
        stats = cache.stats()
    # Reference: a window of 4 sliding by 2 over 0..9, 0..9, ...
    expected = [[(2 * e + k) % 10 for k in range(4)] for e in range(6)]
    assert contents == expected
    assert stats["swaps"] == 2 * 6 and stats["late_swaps"] == 0
    assert set().union(*contents) == set(range(10))


def test_every_item_enters_a_shuffled_cache_and_the_schedule_is_seeded():
    def schedule(seed):
        cache = SmartCache(
            make_items(11),
            index_prefix,
            cache_num=3,
            replace_rate=0.34,
            seed=seed,
            wait_for_replacements=True,
            progress=False,
        )
        with cache:
            contents, orders = run_epochs(cache, 12)
            assert cache.stats()["swaps"] == 2 * 12  # ceil(3 * 0.34) per epoch
        for before, after in zip(contents, contents[1:], strict=False):
            assert after[:1] == before[2:] and len(set(after)) == 3
        return contents, orders

    first, again, other = schedule(5), schedule(5), schedule(6)
    assert first == again
    assert first != other
    assert set().union(*first[0]) == set(range(11))


def test_late_replacements_do_not_stall_training_and_are_swapped_in_later():
    gate = threading.Event()
    initial = set(range(4))

    def gated_prefix(item):
        if index_of(item) not in initial:
            gate.wait(timeout=30)
        return index_prefix(item)

    with SmartCache(
        make_items(8), gated_prefix, cache_num=4, replace_rate=0.5, shuffle=False, progress=False
    ) as cache:
        cache.fill()
        before = cache.cached_indices()
        cache.end_epoch()
        stats = cache.stats()
        assert cache.cached_indices() == before
        assert stats["late_swaps"] == 2 and stats["swaps"] == 0
        assert stats["wait_s_max"] < 0.1
        gate.set()
        deadline = time.monotonic() + 10
        while cache.stats()["ready"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cache.end_epoch()
        assert cache.cached_indices() == [2, 3, 4, 5]
        assert cache.stats()["swaps"] == 2 and cache.stats()["late_swaps"] == 2


def test_a_reader_thread_waits_for_a_swap_in_progress_and_sees_its_result():
    gate = threading.Event()

    def gated_prefix(item):
        if index_of(item) >= 4:
            gate.wait(timeout=30)
        return index_prefix(item)

    seen = []
    cache = SmartCache(
        make_items(8),
        gated_prefix,
        cache_num=4,
        replace_rate=0.5,
        shuffle=False,
        wait_for_replacements=True,
        progress=False,
    )
    try:
        cache.fill()
        swapper = threading.Thread(target=cache.end_epoch)
        swapper.start()
        deadline = time.monotonic() + 10
        while cache._lock.acquire(blocking=False):  # until end_epoch holds the lock
            cache._lock.release()
            assert time.monotonic() < deadline
            time.sleep(0.001)
        reader = threading.Thread(
            target=lambda: seen.append((cache.epoch, [i for i, _ in cache.epoch_items()]))
        )
        reader.start()
        reader.join(timeout=0.2)
        assert reader.is_alive()  # the swap waits for its replacements, and the reader for it
        gate.set()
        swapper.join(timeout=10)
        reader.join(timeout=10)
    finally:
        gate.set()
        cache.close()
    assert seen == [(1, [2, 3, 4, 5])]


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_replacements_run_at_a_lower_priority_than_training(nice):
    priorities = {}

    def recording_prefix(item):
        thread = threading.get_native_id()
        priorities[index_of(item)] = os.getpriority(os.PRIO_PROCESS, thread)
        return index_prefix(item)

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with SmartCache(
        make_items(6),
        recording_prefix,
        cache_num=3,
        replace_rate=1.0,
        shuffle=False,
        progress=False,
        wait_for_replacements=True,
        replace_nice=nice,
    ) as cache:
        cache.fill()
        cache.end_epoch()
    assert [priorities[i] for i in range(3)] == [own] * 3  # the initial fill: full priority
    assert [priorities[i] for i in range(3, 6)] == [min(own + nice, 19)] * 3
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own


def test_strict_schedule_waits_and_records_the_wait():
    def slow_prefix(item):
        if index_of(item) >= 2:
            time.sleep(0.3)
        return index_prefix(item)

    with SmartCache(
        make_items(6),
        slow_prefix,
        cache_num=2,
        replace_rate=0.5,
        shuffle=False,
        wait_for_replacements=True,
        progress=False,
    ) as cache:
        cache.fill()
        cache.end_epoch()
        stats = cache.stats()
    assert stats["swaps"] == 1 and stats["late_swaps"] == 0
    assert 0.1 < stats["wait_s_max"] <= stats["wait_s_total"] < 5


@pytest.mark.parametrize(
    "num_items,world_size,cache_num,replace_rate",
    [(12, 3, 2, 0.5), (12, 3, 3, 1.0), (13, 3, 2, 0.5), (10, 4, 1, 1.0), (9, 2, 3, 0.34)],
)
def test_no_two_ranks_ever_hold_the_same_item(num_items, world_size, cache_num, replace_rate):
    items = make_items(num_items)
    caches = [
        SmartCache(
            items,
            index_prefix,
            cache_num=cache_num,
            replace_rate=replace_rate,
            world_size=world_size,
            rank=r,
            seed=5,
            wait_for_replacements=True,
            progress=False,
        )
        for r in range(world_size)
    ]
    try:
        seen = set()
        for _ in range(12):  # several passes over every part
            held = [set(c.cached_indices()) if c.epoch else set(i for i, _ in c.epoch_items())
                    for c in caches]  # fmt: skip
            assert [len(h) for h in held] == [cache_num] * world_size
            assert sum(len(h) for h in held) == len(set().union(*held)), held
            seen |= set().union(*held)
            for c in caches:
                c.end_epoch()
        assert seen == set(range(num_items))  # every item is trained on
    finally:
        for c in caches:
            c.close()


def test_uncached_ranks_read_disjoint_items_in_epochs_of_equal_length():
    from tf_medseg.cache.sources import UncachedSource

    items = make_items(11)
    sources = [
        UncachedSource(items, index_prefix, seed=3, rank=r, world_size=3, num_workers=1)
        for r in range(3)
    ]
    try:
        for _ in range(5):
            epochs = [[i for i, _ in s.epoch_items()] for s in sources]
            assert [len(e) for e in epochs] == [11 // 3] * 3
            flat = [i for e in epochs for i in e]
            assert len(flat) == len(set(flat))
            for s in sources:
                s.end_epoch()
    finally:
        for s in sources:
            s.close()


def test_each_rank_caches_its_own_shard():
    items = make_items(12)
    caches = [
        SmartCache(items, index_prefix, world_size=3, rank=r, replace_rate=0.0, progress=False)
        for r in range(3)
    ]
    held = []
    for c in caches:
        c.fill()
        held.append(set(c.cached_indices()))
        c.close()
    assert [len(h) for h in held] == [4, 4, 4]
    assert held[0] | held[1] | held[2] == set(range(12))
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])


def test_memory_budget_sizes_the_cache_and_refuses_what_does_not_fit(caplog):
    one = item_nbytes(index_prefix(make_items(1)[0]))
    assert one == SIDE**3 * 4 + SIDE**3 + (8 + 56) * 3 * 4
    items = make_items(10)
    kwargs = dict(progress=False, shuffle=False)
    # A fixed subset (no replacement) is said in one warning.
    with caplog.at_level(logging.WARNING):
        with SmartCache(
            items, index_prefix, replace_rate=0.0, memory_budget_bytes=3.5 * one, **kwargs
        ) as c:
            assert c.cache_num == 3 and c.item_bytes == one
    assert [r.getMessage() for r in caplog.records if "replaces none" in r.getMessage()] == [
        "the cache holds 3 of the 10 items of the training set and replace_rate=0 replaces "
        "none: training sees only those 3; raise replace_rate to cycle the others through"
    ]
    # With replacements in flight: n + ceil(n / 2) <= 3 gives n = 2.
    with SmartCache(
        items, index_prefix, replace_rate=0.5, memory_budget_bytes=3 * one, **kwargs
    ) as c:
        assert (c.cache_num, c.replace_num) == (2, 1)
    with pytest.raises(CacheBudgetError, match="memory budget"):
        SmartCache(items, index_prefix, cache_num=5, replace_rate=0.0, memory_budget_bytes=4 * one)
    with pytest.raises(CacheBudgetError, match="cannot hold one cached item"):
        SmartCache(items, index_prefix, memory_budget_bytes=one // 2)


def test_memory_budget_is_sized_on_the_largest_measured_item_and_agreed_by_the_workers():
    one = item_nbytes(index_prefix(make_items(1)[0]))

    def uneven(item):  # the third item in schedule order (index 2) is the largest
        out = index_prefix(item)
        if index_of(item) == 2:
            out["image"] = np.concatenate([out["image"]] * 4, axis=0)
        return out

    items = make_items(10)
    kwargs = dict(progress=False, shuffle=False, replace_rate=0.0)
    big = item_nbytes(uneven(items[2]))
    assert big > 1.5 * one
    with SmartCache(items, uneven, memory_budget_bytes=4 * big, **kwargs) as c:
        assert c.item_bytes == big and c.cache_num == 4  # not 4 * big // one
    with SmartCache(items, uneven, memory_budget_bytes=4 * big, budget_items=1, **kwargs) as c:
        assert c.item_bytes == one and c.cache_num == min(10, 4 * big // one)
    # Every worker uses the smallest size any worker can hold.
    seen = []

    def agree(mine):
        seen.append(mine)
        return min(mine, 2)

    with SmartCache(items, uneven, memory_budget_bytes=4 * big, agree=agree, **kwargs) as c:
        assert seen == [4] and c.cache_num == 2
        assert len(c.epoch_items()) == 2
    # A worker whose budget fails makes every worker fail, with a message that says so.
    with pytest.raises(CacheBudgetError, match="on another worker"):
        SmartCache(items, uneven, memory_budget_bytes=4 * big, agree=lambda n: 0, **kwargs)
    with pytest.raises(CacheBudgetError, match=r"another worker\)"):
        SmartCache(
            items, uneven, cache_num=3, memory_budget_bytes=4 * big, agree=lambda n: -1, **kwargs
        )


def failing_prefix(bad_index):
    def prefix(item):
        if index_of(item) == bad_index:
            raise ValueError("truncated gzip stream")
        return index_prefix(item)

    return prefix


def test_prefix_failure_during_fill_names_the_file():
    with SmartCache(make_items(6), failing_prefix(4), progress=False) as cache:
        with pytest.raises(CachePrefixError, match="imagesTr/case_004.nii.gz") as info:
            cache.epoch_items()
    assert isinstance(info.value.__cause__, ValueError)
    assert "truncated gzip stream" in str(info.value)


@pytest.mark.parametrize("wait", [True, False])
def test_prefix_failure_in_a_replacement_is_raised_at_the_boundary(wait):
    cache = SmartCache(
        make_items(6),
        failing_prefix(3),
        cache_num=2,
        replace_rate=0.5,
        shuffle=False,
        wait_for_replacements=wait,
        progress=False,
    )
    with cache:
        cache.end_epoch()  # item 2 swapped in (or late), item 3 starts
        deadline = time.monotonic() + 10
        with pytest.raises(CachePrefixError, match="case_003"):
            while time.monotonic() < deadline:
                cache.end_epoch()
                time.sleep(0.01)


def test_state_restores_the_same_schedule():
    def new_cache():
        return SmartCache(
            make_items(9),
            index_prefix,
            cache_num=4,
            replace_rate=0.5,
            seed=3,
            wait_for_replacements=True,
            progress=False,
        )

    with new_cache() as cache:
        run_epochs(cache, 3)
        state = json.loads(json.dumps(cache.state()))
        expected = run_epochs(cache, 5)
    assert state["epoch"] == 3
    with new_cache() as resumed:
        resumed.restore(state)
        assert resumed.epoch == 3
        assert run_epochs(resumed, 5) == expected
    with SmartCache(make_items(9), index_prefix, cache_num=3, seed=3, progress=False) as other:
        with pytest.raises(ValueError, match="cache_num"):
            other.restore(state)


def test_close_stops_the_threads_and_frees_the_items():
    cache = SmartCache(make_items(6), index_prefix, cache_num=3, replace_rate=0.5, progress=False)
    cache.fill()
    assert cache.stats()["cache_bytes"] > 0
    cache.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("smart-cache")]
    assert alive == []
    assert cache.stats()["cache_bytes"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.epoch_items()


def test_initial_fill_shows_a_progress_bar(capsys):
    with SmartCache(make_items(3), index_prefix, replace_rate=0.0) as cache:
        cache.fill()
    assert "smart cache fill" in capsys.readouterr().err


class CountingPrefix:
    def __init__(self, setting):
        self.setting = setting
        self.calls = 0

    def __call__(self, item):
        self.calls += 1
        return index_prefix(item)

    def config_fingerprint(self):
        return f"index_prefix(setting={self.setting})"


def test_cache_dir_lets_a_second_cache_skip_the_prefix(tmp_path):
    items = make_items(4)
    for path in ("image", "label"):
        for item in items:
            item[path] = str(tmp_path / f"{item['case']}_{path}.bin")
            (tmp_path / f"{item['case']}_{path}.bin").write_bytes(b"x")
    first, second = CountingPrefix(1), CountingPrefix(1)
    kwargs = dict(replace_rate=0.0, cache_dir=str(tmp_path / "cache"), progress=False)
    with SmartCache(items, first, **kwargs) as cache:
        reference = {i: item["image"] for i, item in cache.epoch_items()}
    with SmartCache(items, second, **kwargs) as cache:
        for index, item in cache.epoch_items():
            np.testing.assert_array_equal(item["image"], reference[index])
            assert item["image"].ctypes.data % 64 == 0
    assert (first.calls, second.calls) == (4, 0)


def test_a_full_cache_holds_every_item_or_refuses_in_one_line_naming_the_smart_cache():
    """``--cache=full`` means every item: a budget that cannot hold them all is an error that
    says how much is needed and what to use instead (before, the budget shrank it to a fixed
    subset that was never replaced, without a word)."""
    one = item_nbytes(index_prefix(make_items(1)[0]))
    items = make_items(10)
    kwargs = dict(progress=False, shuffle=False)
    with make_source(
        "full", items, index_prefix, SourceOptions(memory_budget_bytes=10 * one, **kwargs)
    ) as c:
        c.fill()
        assert c.cache_num == 10 and sorted(c.cached_indices()) == list(range(10))
    with pytest.raises(CacheBudgetError) as err:
        make_source(
            "full", items, index_prefix, SourceOptions(memory_budget_bytes=3.5 * one, **kwargs)
        )
    message = str(err.value)
    assert "\n" not in message
    assert "--cache=full holds every one of the 10 items" in message
    assert f"{10 * one / 2**20:.1f} MB" in message and "--cache=smart" in message
    assert "it holds 3 and replaces them" in message


def test_late_swaps_counts_each_late_replacement_once_however_many_boundaries_it_misses():
    """``late_swaps`` is the number of replacements that missed their boundary: one that stays
    in flight over three boundaries is one late replacement, not three."""
    gate = threading.Event()

    def gated_prefix(item):
        if index_of(item) >= 4:
            gate.wait(timeout=30)
        return index_prefix(item)

    with SmartCache(
        make_items(8), gated_prefix, cache_num=4, replace_rate=0.5, shuffle=False, progress=False
    ) as cache:
        cache.fill()
        for _ in range(3):  # items 4 and 5 in flight at each of these boundaries
            cache.end_epoch()
        assert cache.cached_indices() == [0, 1, 2, 3]
        assert cache.stats()["swaps"] == 0 and cache.stats()["late_swaps"] == 2
        gate.set()
        deadline = time.monotonic() + 10
        while cache.stats()["ready"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cache.end_epoch()  # 4 and 5 in at last; 6 and 7 start
        assert cache.cached_indices() == [2, 3, 4, 5]
        assert cache.stats()["swaps"] == 2 and cache.stats()["late_swaps"] == 2
        while cache.stats()["ready"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cache.end_epoch()
        assert cache.cached_indices() == [4, 5, 6, 7]
        assert cache.stats()["swaps"] == 4 and cache.stats()["late_swaps"] == 2
