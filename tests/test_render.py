"""The README's measured tables are the rendering of the committed JSON under docs/bench/."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tf_medseg.bench import render

README = os.path.join(render.ROOT, "README.md")
BENCH = os.path.join(render.ROOT, "docs", "bench")


def test_every_rendered_readme_table_is_its_json_rendered():
    with open(README) as f:
        text = f.read()
    names = [m.group(2) for m in render.BLOCK.finditer(text)]
    assert set(names) == set(render.RENDERERS), "each renderer has its README table, once"
    assert len(names) == len(set(names))
    _, changed = render.rendered_readme(text, BENCH)
    assert changed == [], f"run python -m tf_medseg.bench.render: {changed} differ"


def test_a_json_changed_without_its_table_is_named(tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(BENCH, bench)
    path = bench / "plateau_stop.json"
    data = json.loads(path.read_text())
    data["runs"][0]["best_dice"] = 0.5
    path.write_text(json.dumps(data))
    with open(README) as f:
        text = f.read()
    new, changed = render.rendered_readme(text, str(bench))
    assert changed == ["plateau_stop"]
    assert "0.5 (" in new or "| 0.5 |" in new
    assert render.rendered_readme(new, str(bench))[1] == []  # rewritten: consistent again


def test_a_block_without_a_renderer_is_refused():
    text = "<!-- rendered: nothing_here -->\nold\n<!-- /rendered -->\n"
    with pytest.raises(ValueError, match="nothing_here"):
        render.rendered_readme(text, BENCH)
