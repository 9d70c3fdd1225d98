"""Tests of the tf.data pipeline and its stateless random tail, against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf
from pipeline_reference import build_train_dataset

from tf_medseg.cache import SmartCache
from tf_medseg.cache.sources import SourceOptions, UncachedSource, make_source
from tf_medseg.pipeline import TailOptions, TrainStream, foreground_counts
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.random import (
    choose_centre,
    crop_with_padding,
    random_flip,
    random_intensity_shift,
    sample_seed,
)


def cached_item(case, shape, channels=1, box=None, seed=0):
    """A cached item built with NumPy: a random image and a foreground box (or none)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(*shape, channels)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if box is not None:
        label[tuple(slice(a, b) for a, b in box)] = 1
    return {
        "case": case,
        "image": image,
        "label": label,
        "fg_indices": np.argwhere(label > 0).astype(np.int32),
        "bg_indices": np.argwhere(label == 0).astype(np.int32),
        "geometry": {"steps": []},
    }


def cache_of(volumes, **kwargs):
    """A full SmartCache over prebuilt cached items (the prefix looks them up by case)."""
    by_case = {v["case"]: v for v in volumes}
    items = [{"case": v["case"], "image": f"/data/{v['case']}.nii.gz"} for v in volumes]
    kwargs = {"replace_rate": 0.0, "progress": False, **kwargs}
    return SmartCache(items, lambda item: by_case[item["case"]], **kwargs)


def collect(dataset):
    images, labels = zip(*[(i.numpy(), lb.numpy()) for i, lb in dataset], strict=True)
    return images, labels


VOLUMES = [
    cached_item("a", (24, 32, 28), 2, box=((8, 16), (10, 20), (6, 12)), seed=1),
    cached_item("b", (40, 24, 30), 2, box=((20, 30), (4, 8), (10, 25)), seed=2),
    cached_item("c", (30, 36, 24), 2, box=((0, 4), (0, 4), (0, 4)), seed=3),
]


def test_batches_have_the_documented_shapes_and_types():
    with cache_of(VOLUMES) as cache:
        ds = build_train_dataset(cache, TailOptions(4, (16, 16, 16), 3, seed=1), tf.Variable(0.5))
        images, labels = collect(ds)
    assert [x.shape for x in images] == [(4, 16, 16, 16, 2)] * 2 + [(1, 16, 16, 16, 2)]
    assert [x.shape for x in labels] == [(4, 16, 16, 16)] * 2 + [(1, 16, 16, 16)]
    assert images[0].dtype == np.float32 and labels[0].dtype == np.uint8
    assert set(np.unique(np.concatenate([x.ravel() for x in labels]))) <= {0, 1}


def test_batches_are_bit_identical_whatever_the_parallelism():
    runs = []
    with cache_of(VOLUMES, seed=4) as cache:
        for calls in (1, 2, tf.data.AUTOTUNE):
            ds = build_train_dataset(
                cache,
                TailOptions(2, (16, 12, 20), 4, seed=7, num_parallel_calls=calls),
                tf.Variable(0.5),
            )
            runs.append(collect(ds))
        cache.end_epoch()
        next_epoch = collect(
            build_train_dataset(cache, TailOptions(2, (16, 12, 20), 4, seed=7), 0.5)
        )
    for images, labels in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], images + labels, strict=True):
            assert np.array_equal(a, b)
    assert not np.array_equal(runs[0][0][0], next_epoch[0][0])
    with cache_of(VOLUMES, seed=4) as cache:
        other_seed = collect(
            build_train_dataset(cache, TailOptions(2, (16, 12, 20), 4, seed=8), 0.5)
        )
    assert not np.array_equal(runs[0][0][0], other_seed[0][0])


def per_epoch_batches(cache, epochs):
    """Reference: one build_train_dataset pass per epoch."""
    out = []
    ds = build_train_dataset(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5)
    for _ in range(epochs):
        out.append([(x.numpy(), y.numpy()) for x, y in ds])
        cache.end_epoch()
    return out


def assert_same_epochs(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_train_stream_gives_the_per_epoch_batches_with_smart_cache_swaps():
    options = {"cache_num": 2, "replace_rate": 0.5, "wait_for_replacements": True}
    with cache_of(VOLUMES, **options) as cache:
        direct = per_epoch_batches(cache, 4)
    with cache_of(VOLUMES, **options) as cache:
        with TrainStream(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5) as stream:
            assert stream.steps_per_epoch == 2
            streamed = []
            for _ in range(4):
                streamed.append([(x.numpy(), y.numpy()) for x, y in stream.epoch()])
                stream.end_epoch()
            assert cache.stats()["swaps"] == 4  # one replacement at each of the 4 boundaries
    assert_same_epochs(direct, streamed)
    assert not np.array_equal(direct[0][0][0], direct[1][0][0])


@pytest.mark.parametrize("skip", [0, 1, 2, 3])
def test_train_stream_resumed_in_an_epoch_gives_the_rest_of_its_batches(skip):
    """A run resumed after ``skip`` batches of an epoch (its smart cache restored to the
    epoch's start) gets that epoch's remaining batches and then the later epochs', bit for bit;
    the skipped patches are not cut."""
    options = {"cache_num": 2, "replace_rate": 0.5, "wait_for_replacements": True}
    tail = TailOptions(2, (8, 8, 8), 3, seed=1)  # 2 items x 3 samples: 3 batches per epoch
    with cache_of(VOLUMES, **options) as cache, TrainStream(cache, tail, 0.5) as stream:
        whole = []
        for _ in range(3):
            if len(whole) == 1:
                saved = cache.state()  # the position at the start of epoch 1
            whole.append([(x.numpy(), y.numpy()) for x, y in stream.epoch()])
            stream.end_epoch()
    with cache_of(VOLUMES, **options) as cache:
        cache.restore(saved)
        with TrainStream(cache, tail, 0.5) as stream:
            stream.resume_at(skip)
            resumed = []
            for _ in range(2):
                resumed.append([(x.numpy(), y.numpy()) for x, y in stream.epoch()])
                stream.end_epoch()
            with pytest.raises(RuntimeError, match="before the epoch starts"):
                stream.resume_at(1)
    assert len(resumed[0]) == 3 - skip
    assert_same_epochs([whole[1][skip:], whole[2]], resumed)
    with cache_of(VOLUMES, **options) as cache, TrainStream(cache, tail, 0.5) as stream:
        with pytest.raises(ValueError, match="outside an epoch of 3"):
            stream.resume_at(4)


def test_train_stream_epoch_left_early_restarts_at_the_next_epoch():
    with cache_of(VOLUMES) as cache:
        direct = per_epoch_batches(cache, 3)
    with (
        cache_of(VOLUMES) as cache,
        TrainStream(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5) as stream,
    ):
        assert stream.steps_per_epoch == 3
        first = next(iter(stream.epoch()))  # one batch of epoch 0, then the epoch is ended
        stream.end_epoch()
        rest = []
        for _ in range(2):
            rest.append([(x.numpy(), y.numpy()) for x, y in stream.epoch()])
            stream.end_epoch()
    np.testing.assert_array_equal(first[0].numpy(), direct[0][0][0])
    assert_same_epochs(direct[1:], rest)


def test_train_stream_refuses_an_epoch_changed_behind_its_back():
    with (
        cache_of(VOLUMES) as cache,
        TrainStream(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5) as stream,
    ):
        batches = stream.epoch()
        next(batches)
        next(batches)
        cache.end_epoch()  # not through the stream: the next batch belongs to the old epoch
        with pytest.raises(RuntimeError, match="end_epoch"):
            next(batches)


def test_train_stream_close_returns_while_waiting_for_the_next_epoch():
    import time

    with cache_of(VOLUMES) as cache:
        stream = TrainStream(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5)
        list(stream.epoch())  # the prefetcher now waits for end_epoch()
        start = time.perf_counter()
        stream.close()
        assert time.perf_counter() - start < 2.0
        with pytest.raises(RuntimeError, match="closed"):
            next(stream.epoch())


def test_train_stream_held_epoch_uses_the_fraction_set_before_it_starts():
    """The trainer's order at a validating boundary: end the epoch holding the next one, change
    the sampler's fraction, start it. With 1-voxel patches the label is the centre's class."""
    import time

    fraction = tf.Variable(1.0)
    with cache_of(VOLUMES, cache_num=2, replace_rate=0.5, wait_for_replacements=True) as cache:
        with TrainStream(
            cache, TailOptions(2, (1, 1, 1), 4, seed=1, flip=False), fraction
        ) as stream:
            first = np.concatenate([y.numpy().ravel() for _, y in stream.epoch()])
            stream.end_epoch(start_next=False)
            time.sleep(0.5)  # a prefetcher that did not wait would cut patches now
            fraction.assign(0.0)
            stream.start_next_epoch()
            for _ in range(3):
                later = np.concatenate([y.numpy().ravel() for _, y in stream.epoch()])
                assert later.size == 8 and not later.any(), "every patch background-centred"
                stream.end_epoch()
    assert first.size == 8 and first.all(), "every patch foreground-centred"


def test_train_stream_runs_without_the_autotuning_thread():
    """Destroying an iterator joins tf.data's autotuning thread, which took up to 10 s in the
    middle of an optimisation pass: Ctrl-C then hung in close(). The stream runs without it."""
    with (
        cache_of(VOLUMES) as cache,
        TrainStream(cache, TailOptions(2, (8, 8, 8), 2, seed=1), 0.5) as stream,
    ):
        dataset = stream._dataset_of(0)
        assert dataset.options().autotune.enabled is False
        assert dataset.options().deterministic is True


def test_train_stream_drop_remainder_needs_a_full_batch():
    with cache_of(VOLUMES[:1]) as cache:
        with pytest.raises(ValueError, match="no full batch"):
            TrainStream(cache, TailOptions(4, (8, 8, 8), 2, seed=1, drop_remainder=True), 0.5)
        stream = TrainStream(cache, TailOptions(2, (8, 8, 8), 3, seed=1, drop_remainder=True), 0.5)
        assert [x.shape[0] for x, _ in stream.epoch()] == [2]
        stream.close()


def numpy_crop(image, label, centre, patch):
    """Reference: start clamped inside, axes shorter than the patch zero-padded evenly."""
    shape = np.array(label.shape)
    patch = np.array(patch)
    size = np.minimum(shape, patch)
    start = np.clip(np.array(centre) - patch // 2, 0, np.maximum(shape - patch, 0))
    window = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    before = (patch - size) // 2
    pads = [(b, p - n - b) for b, p, n in zip(before, patch, size, strict=True)]
    return np.pad(image[window], pads + [(0, 0)]), np.pad(label[window], pads)


@pytest.mark.parametrize(
    "shape,centre",
    [
        ((24, 30, 20), (12, 15, 10)),  # inside
        ((24, 30, 20), (0, 0, 0)),  # clamped at the start
        ((24, 30, 20), (23, 29, 19)),  # clamped at the end
        ((10, 30, 7), (5, 29, 3)),  # smaller than the patch along two axes: padded
        ((9, 9, 9), (8, 0, 4)),  # smaller along all axes
    ],
)
def test_crop_clamps_the_centre_and_pads_small_volumes(shape, centre):
    image = np.arange(np.prod(shape) * 2, dtype=np.float32).reshape(*shape, 2) + 1
    label = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.uint8)
    patch = (16, 16, 12)
    got_image, got_label = crop_with_padding(
        tf.constant(image), tf.constant(label), tf.constant(centre, tf.int32), patch
    )
    want_image, want_label = numpy_crop(image, label, centre, patch)
    np.testing.assert_array_equal(got_image.numpy(), want_image)
    np.testing.assert_array_equal(got_label.numpy(), want_label)
    if all(s >= p for s, p in zip(shape, patch, strict=True)):
        assert np.all(got_image.numpy() > 0)  # stays inside: no padding


def test_flips_and_intensity_shift_match_numpy():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 7, 8, 1)).astype(np.float32)
    label = rng.integers(0, 3, size=(6, 7, 8)).astype(np.int32)
    flipped_axes = np.zeros(3)
    for k in range(64):
        seed = tf.constant([k, 1], tf.int64)
        got_image, got_label = random_flip(tf.constant(image), tf.constant(label), seed)
        flags = tf.random.stateless_uniform([3], seed).numpy() < 0.5
        axes = tuple(int(a) for a in np.flatnonzero(flags))
        np.testing.assert_array_equal(got_image.numpy(), np.flip(image, axes))
        np.testing.assert_array_equal(got_label.numpy(), np.flip(label, axes))
        flipped_axes += flags
    assert np.all((flipped_axes > 16) & (flipped_axes < 48))
    offsets = []
    for k in range(64):
        shifted = random_intensity_shift(tf.constant(image), 0.1, tf.constant([k, 2], tf.int64))
        delta = shifted.numpy() - image
        np.testing.assert_allclose(delta, delta.flat[0], atol=1e-6)
        offsets.append(delta.flat[0])
    assert -0.1 <= min(offsets) < -0.05 and 0.05 < max(offsets) <= 0.1


def centre_is_foreground(labels, patch):
    """Label at the patch centre voxel (the centre never clamps in these volumes)."""
    c = tuple(p // 2 for p in patch)
    return np.concatenate([lb[(slice(None), *c)] for lb in labels]) > 0


def test_ratio_variable_changes_the_foreground_fraction_without_rebuilding():
    volumes = [
        cached_item(f"v{i}", (32, 32, 32), box=((12, 20), (12, 20), (12, 20)), seed=i)
        for i in range(4)
    ]
    patch = (8, 8, 8)
    pos = tf.Variable(0.5, dtype=tf.float32, trainable=False)
    with cache_of(volumes) as cache:
        ds = build_train_dataset(cache, TailOptions(50, patch, 100, seed=3, flip=False), pos)
        fractions = {}
        for value in (0.5, 0.9, 0.0, 1.0):
            pos.assign(value)
            fractions[value] = centre_is_foreground(collect(ds)[1], patch).mean()
            cache.end_epoch()
    # 400 patches per value: 4 binomial standard deviations at p = 0.5 is 0.1.
    assert abs(fractions[0.5] - 0.5) < 0.1
    assert abs(fractions[0.9] - 0.9) < 0.06
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0


def test_empty_index_lists_fall_back():
    seed = tf.constant([5, 5], tf.int64)
    shape = tf.constant([10, 12, 14], tf.int32)
    bg = tf.constant([[1, 2, 3], [4, 5, 6]], tf.int32)
    empty = tf.zeros([0, 3], tf.int32)
    for k in range(20):
        seed = tf.constant([k, 5], tf.int64)
        centre, from_fg = choose_centre(shape, empty, bg, 1.0, seed)
        assert not from_fg and centre.numpy().tolist() in ([1, 2, 3], [4, 5, 6])
        centre, from_fg = choose_centre(shape, bg, empty, 0.0, seed)
        assert from_fg and centre.numpy().tolist() in ([1, 2, 3], [4, 5, 6])
        centre, from_fg = choose_centre(shape, empty, empty, 0.5, seed)
        assert not from_fg and np.all((centre.numpy() >= 0) & (centre.numpy() < [10, 12, 14]))
    volume = cached_item("empty", (20, 20, 20), box=None)
    with cache_of([volume]) as cache:
        labels = collect(build_train_dataset(cache, TailOptions(8, (8, 8, 8), 8, seed=0), 1.0))[1]
    assert all(np.all(lb == 0) for lb in labels)


def test_sources_of_each_mode():
    by_case = {v["case"]: v for v in VOLUMES}
    calls = []

    def prefix(item):
        calls.append(item["case"])
        return by_case[item["case"]]

    items = [{"case": c, "image": f"/data/{c}.nii.gz"} for c in by_case]
    with make_source("none", items, prefix) as source:
        assert isinstance(source, UncachedSource)
        ds = build_train_dataset(source, TailOptions(3, (8, 8, 8), 2, seed=0), 0.5, num_channels=2)
        for _ in range(2):
            assert sum(x.shape[0] for x, _ in ds) == 6
            source.end_epoch()
    assert sorted(calls) == sorted(list(by_case) * 2)
    with make_source("full", items, prefix, SourceOptions(progress=False)) as source:
        assert (source.cache_num, source.replace_num) == (3, 0)
    smart = SourceOptions(cache_num=2, replace_rate=0.5)
    with make_source("smart", items, prefix, smart) as source:
        assert (source.cache_num, source.replace_num) == (2, 1)
    with pytest.raises(ValueError, match="unknown cache mode"):
        make_source("lru", items, prefix)


def test_prefix_failure_surfaces_through_the_dataset():
    def prefix(item):
        if item["case"] == "b":
            raise OSError("truncated file")
        return VOLUMES[0]

    items = [{"case": c, "image": f"/data/imagesTr/{c}.nii.gz"} for c in "abc"]
    with make_source("none", items, prefix, SourceOptions(shuffle=False)) as source:
        ds = build_train_dataset(source, TailOptions(2, (8, 8, 8), 1, seed=0), 0.5, num_channels=2)
        with pytest.raises(tf.errors.OpError, match="imagesTr/b.nii.gz"):
            collect(ds)


def test_sample_seeds_differ_per_component():
    keys = {
        tuple(sample_seed(1, e, r, i, s).numpy())
        for e in range(2)
        for r in range(2)
        for i in range(2)
        for s in range(2)
    }
    assert len(keys) == 16


class CountingPrefix:
    """The real prefix, counting its calls (the disk cache must make the second run skip it)."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.calls = 0

    def __call__(self, item):
        self.calls += 1
        return self.prefix(item)

    def config_fingerprint(self):
        return self.prefix.config_fingerprint()


def test_real_prefix_on_a_synthetic_task(tmp_path):
    from tf_medseg.data.msd import load_task
    from tf_medseg.data.synthetic import generate_task
    from tf_medseg.transforms import build_preprocessing

    generate_task("spleen", str(tmp_path / "task"), num_train=3, num_test=0, size=32, seed=0)
    task = load_task(str(tmp_path / "task"))
    items = list(task.training)
    chain = build_preprocessing(task, items, progress=False)
    kwargs = dict(replace_rate=0.0, cache_dir=str(tmp_path / "cache"), progress=False)
    first = CountingPrefix(chain)
    with SmartCache(items, first, **kwargs) as cache:
        reference = {i: chain(items[i]) for i, _ in cache.epoch_items()}
        ds = build_train_dataset(cache, TailOptions(4, (16, 16, 16), 4, seed=0), 1.0)
        images, labels = collect(ds)
    assert first.calls == 3
    assert [x.shape for x in images] == [(4, 16, 16, 16, 1)] * 3
    # Foreground centres with pos_fraction 1: the centre voxel stays inside every patch.
    assert all(lb.reshape(4, -1).max(axis=1).min() == 1 for lb in labels)

    second = CountingPrefix(chain)
    with SmartCache(items, second, **kwargs) as cache:
        cached = dict(cache.epoch_items())
    assert second.calls == 0
    for index, item in cached.items():
        for key in ("image", "label", "fg_indices", "bg_indices"):
            np.testing.assert_array_equal(item[key], reference[index][key])
        assert item["geometry"] == reference[index]["geometry"]
    for index, item in cached.items():
        assert item["case"] == items[index]["case"]


def test_pipeline_benchmark_runs_at_a_tiny_size(tmp_path):
    from tf_medseg.bench.pipeline import BenchConfig, format_table, run_benchmark

    config = BenchConfig(
        work_dir=str(tmp_path),
        num_volumes=4,
        size=24,
        patch=12,
        step_s=0.01,
        stall_epochs=1,
        none_epochs=1,
        cached_epochs=3,
    )
    results = run_benchmark(config)
    assert set(results) >= {"none", "full", "smart", "peak_rss_bytes"}
    assert all(results[m]["patches_per_s"] > 0 for m in ("none", "full", "smart"))
    assert results["none"]["patches"] == 4 * 4
    assert results["full"]["patches"] == 3 * 4 * 4
    assert results["smart"]["patches"] == 6 * 2 * 4 and results["smart"]["cache_num"] == 2
    assert results["full"]["fill_s"] > 0 and results["smart"]["fill_s"] > 0
    assert 0 <= results["smart"]["stall_fraction"] < 1
    assert results["peak_rss_bytes"] > 0
    assert "smart" in format_table(results)


def test_balanced_centres_give_a_small_class_half_of_the_foreground_patches():
    label = np.zeros((30, 30, 30), np.uint8)
    label[:20, :20, :20] = 1
    label[5:7, 5:7, 5:7] = 2  # 8 voxels of 8000
    item = ForegroundIndices(max_indices=100_000)({"case": "c", "label": label})
    fg, bg, counts = item["fg_indices"], item["bg_indices"], item["fg_counts"]
    np.testing.assert_array_equal(counts, [8000 - 8, 8])  # class 1's rows, then class 2's
    np.testing.assert_array_equal(foreground_counts(label, fg), counts)
    shape = tf.constant(label.shape, tf.int32)

    def lesion_share(fg_counts):
        hits = []
        for i in range(400):
            seed = tf.constant([i, 7], tf.int64)
            centre, from_fg = choose_centre(shape, fg, bg, 1.0, seed, fg_counts)
            assert bool(from_fg)
            hits.append(label[tuple(centre.numpy())] == 2)
        return np.mean(hits)

    assert 0.4 < lesion_share(tf.constant(counts)) < 0.6
    assert lesion_share(None) < 0.02
    one = tf.constant([len(fg)], tf.int32)  # one class: the pooled draw, seed for seed
    for i in range(20):
        seed = tf.constant([i, 3], tf.int64)
        a, _ = choose_centre(shape, fg, bg, 0.7, seed, one)
        b, _ = choose_centre(shape, fg, bg, 0.7, seed)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    mixed = fg[np.random.default_rng(0).permutation(len(fg))]  # classes not grouped: pooled
    np.testing.assert_array_equal(foreground_counts(label, mixed), [len(fg)])
    np.testing.assert_array_equal(foreground_counts(label, fg[:0]), [0])
