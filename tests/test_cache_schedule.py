"""Tests of the smart cache's schedule on ids alone: no threads, no prefix."""

import json
import math

import numpy as np
import pytest

from tf_medseg.cache import CacheSchedule, rank_shard, smallest_shard
from tf_medseg.cache.schedule import STATE_VERSION, RankWalk, replace_count


def names_of(num_items, prefix="case"):
    return [f"{prefix}_{i:03d}" for i in range(num_items)]


def make_schedule(
    num_items=10, cache_num=4, replace_num=2, seed=0, rank=0, world_size=1, shuffle=True, names=None
):
    walk = RankWalk(num_items, seed, rank, world_size, shuffle)
    return CacheSchedule(walk, cache_num, replace_num, names or names_of(num_items))


def boundary(schedule, ready=None):
    """One epoch boundary: the ready ids (all pending by default) in, next epoch, top up."""
    schedule.swap(schedule.pending if ready is None else ready)
    schedule.advance_epoch()
    schedule.top_up()


def some_ready(schedule, rng):
    """A random subset of the pending ids, as thread timing would leave ready."""
    return [i for i in schedule.pending if rng.random() < 0.5]


def future_of(schedule, epochs, seed):
    """What the schedule does over ``epochs`` boundaries with seeded random readiness."""
    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(epochs):
        trace.append((schedule.epoch_order(), schedule.pending, schedule.cursor))
        boundary(schedule, some_ready(schedule, rng))
    return trace


@pytest.mark.parametrize("num_items,world_size", [(10, 3), (12, 3), (4, 4), (7, 2)])
def test_rank_parts_are_disjoint_cover_every_item_and_are_walked_in_new_orders(
    num_items, world_size
):
    parts = [set(rank_shard(num_items, 9, 0, r, world_size, True)) for r in range(world_size)]
    assert set().union(*parts) == set(range(num_items))
    assert sum(len(p) for p in parts) == num_items  # disjoint
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert min(map(len, parts)) == smallest_shard(num_items, world_size)
    for r in range(world_size):  # the same part on every pass, in a new order
        passes = [tuple(rank_shard(num_items, 9, p, r, world_size, True)) for p in range(6)]
        assert all(set(p) == parts[r] for p in passes)
        assert len(parts[r]) < 3 or len(set(passes)) > 1
    with pytest.raises(ValueError, match="cannot give 4 workers one item each"):
        rank_shard(2, 9, 0, 0, 4, True)


def test_the_walk_chains_the_passes_of_the_rank_part():
    walk = RankWalk(11, 4, 2, 3, True)
    passes = [list(rank_shard(11, 4, p, 2, 3, True)) for p in range(5)]
    assert walk.part_size == 3
    assert [walk[p] for p in range(15)] == sum(passes, [])
    assert walk.head(2) == passes[0][:2] and walk.head(99) == passes[0]
    assert [RankWalk(7, 0, 1, 2, False)[p] for p in range(6)] == [1, 3, 5, 1, 3, 5]


@pytest.mark.parametrize(
    "cache_num,replace_rate,shard_size,expected",
    [(4, 0.5, 10, 2), (3, 0.34, 11, 2), (8, 1.0, 10, 2), (10, 0.1, 10, 0), (5, 0.0, 10, 0)],
)
def test_replace_count_rounds_up_and_never_exceeds_the_items_outside(
    cache_num, replace_rate, shard_size, expected
):
    assert replace_count(cache_num, replace_rate, shard_size) == expected


@pytest.mark.parametrize("rank,world_size,shuffle", [(0, 1, True), (1, 3, True), (2, 3, False)])
def test_a_fresh_schedule_holds_the_first_cache_num_ids_of_the_walk(rank, world_size, shuffle):
    schedule = make_schedule(13, 3, 1, seed=2, rank=rank, world_size=world_size, shuffle=shuffle)
    walk = RankWalk(13, 2, rank, world_size, shuffle)
    assert schedule.initial_ids() == [walk[p] for p in range(3)]
    assert list(schedule.cached) == schedule.initial_ids()
    assert (schedule.pending, schedule.cursor, schedule.epoch) == ((), 3, 0)
    if not shuffle:
        assert list(schedule.cached) == list(range(rank, 13, world_size))[:3]


def test_swap_puts_ready_ids_in_pending_order_and_evicts_the_oldest():
    schedule = make_schedule(10, 4, 2, shuffle=False)
    assert schedule.top_up() == [4, 5] and schedule.top_up() == []
    assert schedule.swap([5]) == [0]
    assert (schedule.cached, schedule.pending) == ((1, 2, 3, 5), (4,))
    assert schedule.top_up() == [6]
    assert schedule.swap([6, 4]) == [1, 2]  # 4 became pending first, so it enters first
    assert (schedule.cached, schedule.pending) == ((3, 5, 4, 6), ())
    with pytest.raises(ValueError, match=r"ids \[3\] are not pending"):
        schedule.swap([3])
    assert schedule.cached == (3, 5, 4, 6)


def test_the_strict_schedule_slides_a_window_over_the_walk():
    schedule = make_schedule(10, 4, 2, shuffle=False)
    schedule.top_up()
    contents = []
    for _ in range(6):
        contents.append(list(schedule.cached))
        boundary(schedule)
    assert contents == [[(2 * e + k) % 10 for k in range(4)] for e in range(6)]


@pytest.mark.parametrize(
    "num_items,world_size,cache_num,replace_num",
    [(10, 1, 4, 2), (11, 1, 3, 2), (23, 2, 5, 1), (17, 3, 2, 2), (9, 1, 8, 1)],
)
def test_every_item_enters_the_cache_within_the_bound(
    num_items, world_size, cache_num, replace_num
):
    for rank in range(world_size):
        schedule = make_schedule(
            num_items, cache_num, replace_num, seed=11, rank=rank, world_size=world_size
        )
        part = set(rank_shard(num_items, 11, 0, rank, world_size, True))
        bound = math.ceil((len(part) - cache_num) / replace_num)
        schedule.top_up()
        seen = []
        for _ in range(bound + 1):
            seen.append(set(schedule.cached))
            boundary(schedule)
        assert set().union(*seen) == part
        assert set().union(*seen[:-1]) != part  # the bound is tight


@pytest.mark.parametrize(
    "num_items,cache_num,replace_num", [(10, 4, 2), (7, 3, 3), (12, 1, 1), (9, 8, 1), (6, 6, 0)]
)
def test_no_id_is_ever_both_cached_and_pending_whatever_is_ready(num_items, cache_num, replace_num):
    schedule = make_schedule(num_items, cache_num, replace_num, seed=3)
    rng = np.random.default_rng(0)
    schedule.top_up()
    cursor = schedule.cursor
    for _ in range(80):
        cached, pending = set(schedule.cached), set(schedule.pending)
        assert len(schedule.cached) == len(cached) == cache_num
        assert len(schedule.pending) == len(pending) == replace_num
        assert not cached & pending
        assert cached | pending <= set(range(num_items))
        assert sorted(schedule.epoch_order()) == sorted(cached)
        boundary(schedule, some_ready(schedule, rng))
        assert schedule.cursor >= cursor
        cursor = schedule.cursor


@pytest.mark.parametrize(
    "num_items,world_size,cache_num,replace_rate",
    [(12, 3, 2, 0.5), (12, 3, 3, 1.0), (13, 3, 2, 0.5), (10, 4, 1, 1.0), (9, 2, 3, 0.34),
     (31, 4, 5, 0.2), (50, 7, 4, 0.75)],
)  # fmt: skip
def test_no_two_ranks_ever_hold_the_same_id(num_items, world_size, cache_num, replace_rate):
    schedules = []
    for rank in range(world_size):
        walk = RankWalk(num_items, 5, rank, world_size, True)
        replace_num = replace_count(cache_num, replace_rate, walk.part_size)
        schedules.append(CacheSchedule(walk, cache_num, replace_num, names_of(num_items)))
        schedules[-1].top_up()
    rng = np.random.default_rng(1)
    seen = set()
    for epoch in range(60):  # many passes over every part; each rank late in its own way
        held = [set(s.cached) | set(s.pending) for s in schedules]
        assert sum(len(h) for h in held) == len(set().union(*held)), (epoch, held)
        assert [len(s.cached) for s in schedules] == [cache_num] * world_size
        seen |= set().union(*(set(s.cached) for s in schedules))
        for s in schedules:
            boundary(s, some_ready(s, rng) if epoch % 3 else None)
    assert seen == set(range(num_items))  # every item is trained on


def test_epoch_order_is_a_seeded_shuffle_of_the_cached_ids():
    def orders(seed, shuffle=True):
        schedule = make_schedule(12, 5, 0, seed=seed, shuffle=shuffle)
        result = []
        for _ in range(4):
            result.append(schedule.epoch_order())
            boundary(schedule)
        return result, list(schedule.cached)

    first, cached = orders(4)
    assert all(sorted(o) == sorted(cached) for o in first)
    assert len({tuple(o) for o in first}) > 1  # a new order every epoch
    assert orders(4) == (first, cached) and orders(5)[0] != first
    unshuffled, cached = orders(4, shuffle=False)
    assert unshuffled == [cached] * 4


def test_the_schedule_is_the_one_earlier_checkpoints_saved():
    """Pinned values: a resumed run relies on the same ids, orders and digest for a seed."""
    walk = RankWalk(11, 5, 1, 2, True)
    schedule = CacheSchedule(walk, 3, replace_count(3, 0.34, walk.part_size), names_of(11))
    assert schedule.initial_ids() == [8, 6, 10]
    schedule.top_up()
    orders, pending = [], []
    for _ in range(5):
        orders.append(schedule.epoch_order())
        pending.append(list(schedule.pending))
        boundary(schedule)
    assert orders == [[10, 6, 8], [4, 10, 3], [8, 6, 3], [6, 4, 10], [4, 8, 3]]
    assert pending == [[4, 3], [8, 6], [10, 4], [8, 3], [6, 10]]
    state = schedule.state()
    assert (state["cursor"], state["cached"], state["pending"]) == (23, [3, 6, 10], [8, 4])
    assert state["items"] == "16bca0456c06ba3f"


def test_state_and_restore_give_the_same_future_schedule():
    def new():
        return make_schedule(13, 4, 2, seed=3, rank=1, world_size=2)

    schedule = new()
    schedule.top_up()
    future_of(schedule, 7, seed=0)
    state = json.loads(json.dumps(schedule.state()))
    assert set(state) == {
        "version", "epoch", "cursor", "cached", "pending", "num_items", "items", "seed", "rank",
        "world_size", "cache_num", "replace_num",
    }  # fmt: skip
    assert state["version"] == STATE_VERSION == 2
    assert (state["epoch"], state["cached"], state["pending"]) == (
        7,
        list(schedule.cached),
        list(schedule.pending),
    )
    expected = future_of(schedule, 12, seed=1)
    resumed = new()
    resumed.restore(state)
    assert resumed.state() == state
    assert future_of(resumed, 12, seed=1) == expected
    assert resumed.state() == schedule.state()


def test_a_fresh_schedule_state_restores_to_the_fresh_schedule():
    state = make_schedule(9, 3, 1, seed=8).state()
    assert (state["epoch"], state["cursor"], state["pending"]) == (0, 3, [])
    schedule = make_schedule(9, 3, 1, seed=8)
    boundary(schedule)
    schedule.restore(state)
    assert schedule.state() == state


@pytest.mark.parametrize(
    "change,said",
    [
        (dict(seed=4), "seed 3 -> 4"),
        (dict(cache_num=3), "cache_num 4 -> 3"),
        (dict(rank=0), "rank 1 -> 0"),
        (dict(seed=4, cache_num=3), "seed 3 -> 4, cache_num 4 -> 3"),
        (dict(names=names_of(13, "other")), "items '{saved}' -> '{now}'"),
        (dict(num_items=14, names=names_of(14)), "num_items 13 -> 14, items '{saved}' -> '{now}'"),
    ],
)
def test_restore_into_another_run_names_what_changed_in_one_line(change, said):
    settings = dict(num_items=13, cache_num=4, replace_num=2, seed=3, rank=1, world_size=2)
    saved = make_schedule(**settings)
    saved.top_up()
    boundary(saved)
    state = json.loads(json.dumps(saved.state()))
    other = make_schedule(**{**settings, **change})
    before = other.state()
    with pytest.raises(ValueError) as info:
        other.restore(state)
    said = said.format(saved=state["items"], now=before["items"])
    assert str(info.value) == (f"the checkpoint's smart cache position is for another run ({said})")
    assert other.state() == before  # unchanged


def test_restore_of_an_older_version_is_refused():
    schedule = make_schedule()
    state = {**schedule.state(), "version": 1}
    with pytest.raises(ValueError, match=r"for another run \(version 1 -> 2\)$"):
        schedule.restore(state)


def test_sizes_out_of_range_are_refused():
    walk = RankWalk(10, 0, 0, 3, True)  # a part of 4 items
    with pytest.raises(ValueError, match=r"cache_num must be in \[1, 4\], got 5"):
        CacheSchedule(walk, 5, 0, names_of(10))
    with pytest.raises(ValueError, match=r"replace_num must be in \[0, 1\], got 2"):
        CacheSchedule(walk, 3, 2, names_of(10))
    with pytest.raises(ValueError, match="9 item names for a walk over 10 items"):
        CacheSchedule(walk, 3, 1, names_of(9))
