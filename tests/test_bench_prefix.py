"""The prefix benchmark on a tiny task: every step timed, the item's bytes, the table."""

from __future__ import annotations

import shutil

from tf_medseg.bench import prefix as bench


def test_steps_bytes_and_table(spleen_task_dir, tmp_path):
    root = tmp_path / "spleen"
    shutil.copytree(spleen_task_dir, root)  # the benchmark stores the statistics there
    report = bench.run_benchmark(str(root), num_cases=2, repeats=1)
    assert [c["case"] for c in report["cases"]] == ["spleen_000", "spleen_001"]
    steps = ["load", "orient", "resample+crop", "normalise", "indices"]
    assert list(report["median"]["steps"]) == steps
    for case in report["cases"]:
        assert all(case["steps"][s] >= 0 for s in steps)
        assert case["total_s"] >= sum(case["steps"].values()) * 0.99
        assert case["bytes"] > 4 * 32 * 32 * 10  # the float32 image at least
    assert report["stats_s"] > 0 and report["stats_cases"] == 2
    table = bench.format_table(report)
    assert "resample+crop" in table and "spleen_001" in table and "statistics" in table
