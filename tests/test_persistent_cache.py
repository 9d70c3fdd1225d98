"""Tests of the on-disk prefix cache: round trip, invalidation, corruption, atomic writes."""

import logging
import os

import numpy as np
import pytest

from tf_medseg.cache import PersistentPrefixCache, item_key


class Prefix:
    """A fingerprinted prefix whose output depends on its setting and counts its calls."""

    def __init__(self, scale=1.0, geometry_extra=None):
        self.scale = scale
        self.calls = 0
        self.geometry_extra = geometry_extra or {}

    def __call__(self, item):
        self.calls += 1
        rng = np.random.default_rng(len(item["case"]))
        image = (rng.normal(size=(5, 6, 7, 2)) * self.scale).astype(np.float32)
        label = (rng.uniform(size=(5, 6, 7)) > 0.7).astype(np.uint8)
        return {
            "case": item["case"],
            "image": image,
            "label": label,
            "fg_indices": np.argwhere(label > 0).astype(np.int32),
            "bg_indices": np.zeros((0, 3), np.int32),
            "geometry": {
                "affine": np.diag([0.8, 0.8, 2.5, 1.0]),
                "spacing": (0.8, 0.8, 2.5),
                "shape": [5, 6, 7],
                "crop": {"start": (1, 2, 3), "orientation": "RAS"},
                "scale": np.float32(self.scale),
                **self.geometry_extra,
            },
        }

    def config_fingerprint(self):
        return f"Prefix(scale={self.scale})"


@pytest.fixture
def item(tmp_path):
    for name in ("image.nii.gz", "label.nii.gz"):
        (tmp_path / name).write_bytes(b"0123456789")
    return {
        "case": "spleen_003",
        "image": str(tmp_path / "image.nii.gz"),
        "label": str(tmp_path / "label.nii.gz"),
    }


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    ga, gb = a["geometry"], b["geometry"]
    np.testing.assert_array_equal(ga["affine"], gb["affine"])
    assert gb["affine"].dtype == np.float64
    assert gb["spacing"] == (0.8, 0.8, 2.5) and isinstance(gb["spacing"], tuple)
    assert gb["shape"] == [5, 6, 7]
    assert gb["crop"] == {"start": (1, 2, 3), "orientation": "RAS"}
    assert gb["scale"] == ga["scale"] and type(gb["scale"]) is np.float32
    assert b["case"] == a["case"]


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_second_run_loads_from_disk_without_the_prefix(tmp_path, item):
    folder = tmp_path / "cache"
    first = PersistentPrefixCache(folder, Prefix())
    computed = first(item)
    second_prefix = Prefix()
    second = PersistentPrefixCache(folder, second_prefix)
    loaded = second(item)
    assert second_prefix.calls == 0 and second.counts["hits"] == 1
    assert_same(computed, loaded)
    assert first.counts == {"hits": 0, "misses": 1, "corrupt": 0, "writes": 1, "skipped_writes": 0}
    # Plain arrays only: loadable without pickle.
    with np.load(first.path(item), allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)


def test_changed_setting_or_input_file_invalidates(tmp_path, item):
    folder = tmp_path / "cache"
    PersistentPrefixCache(folder, Prefix(scale=1.0))(item)
    changed = Prefix(scale=2.0)
    out = PersistentPrefixCache(folder, changed)(item)
    assert changed.calls == 1
    np.testing.assert_allclose(out["image"], 2.0 * Prefix(1.0)(item)["image"], rtol=0, atol=1e-6)
    assert len(cache_files(folder)) == 2

    key_before = item_key(item, "Prefix(scale=1.0)")
    with open(item["image"], "ab") as f:
        f.write(b"more bytes")
    assert item_key(item, "Prefix(scale=1.0)") != key_before
    again = Prefix(scale=1.0)
    PersistentPrefixCache(folder, again)(item)
    assert again.calls == 1


def test_corrupt_file_is_recomputed_with_a_warning(tmp_path, item, caplog):
    folder = tmp_path / "cache"
    cache = PersistentPrefixCache(folder, Prefix())
    reference = cache(item)
    path = cache.path(item)
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"not a zip file", b""):
        path.write_bytes(broken)
        prefix = Prefix()
        with caplog.at_level(logging.WARNING, logger="tf_medseg.cache.persistent"):
            out = PersistentPrefixCache(folder, prefix)(item)
        assert prefix.calls == 1
        assert "unreadable" in caplog.text and path.name in caplog.text
        assert_same(reference, out)
        caplog.clear()
    # The recomputed file was written back and is good again.
    prefix = Prefix()
    PersistentPrefixCache(folder, prefix)(item)
    assert prefix.calls == 0


def test_failed_write_leaves_no_partial_file(tmp_path, item, monkeypatch, caplog):
    folder = tmp_path / "cache"
    cache = PersistentPrefixCache(folder, Prefix())

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with caplog.at_level(logging.WARNING, logger="tf_medseg.cache.persistent"):
        out = cache(item)
    assert out["image"].shape == (5, 6, 7, 2)
    assert cache_files(folder) == []
    assert cache.counts["skipped_writes"] == 1
    assert "No space left" in caplog.text


def test_free_space_check_skips_the_write(tmp_path, item, caplog):
    folder = tmp_path / "cache"
    cache = PersistentPrefixCache(folder, Prefix(), reserve_bytes=1 << 60)
    with caplog.at_level(logging.WARNING, logger="tf_medseg.cache.persistent"):
        out = cache(item)
    assert out["label"].dtype == np.uint8
    assert cache_files(folder) == []
    assert "MB free" in caplog.text


def test_values_that_need_pickle_are_not_written(tmp_path, item, caplog):
    folder = tmp_path / "cache"
    cache = PersistentPrefixCache(folder, Prefix(geometry_extra={"reader": object()}))
    with caplog.at_level(logging.WARNING, logger="tf_medseg.cache.persistent"):
        cache(item)
    assert cache_files(folder) == [] and "cannot store a value of type object" in caplog.text

    class ObjectArrayPrefix(Prefix):
        def __call__(self, item):
            return {**super().__call__(item), "extra": np.array([{"a": 1}], dtype=object)}

    cache = PersistentPrefixCache(folder, ObjectArrayPrefix())
    cache(item)
    assert cache_files(folder) == []


def test_prefix_without_fingerprint_is_refused(tmp_path):
    with pytest.raises(TypeError, match="config_fingerprint"):
        PersistentPrefixCache(tmp_path, lambda item: {})
