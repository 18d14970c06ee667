"""Smoke run of `emotion-dist bench` on tiny sizes: it runs and prints every row (no speed assertions)."""

import json
import sys

import pytest

from conftest import run

pytestmark = pytest.mark.slow


def test_bench_prints_every_row(tmp_path):
    out = run([sys.executable, "-m", "emotion_dist.cli", "bench", "--images", "120", "--image-size", "32",
               "--batch", "8", "--steps", "2", "--workers", "0", "--epochs", "1", "--ultralytics",
               "--cache-dir", str(tmp_path / "cache"), "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "b.json")],
              timeout=600)
    for row in ("(a) classic loader", "(b) fast loader", "(c) model step", "(d) end-to-end classic",
                "(e) end-to-end fast", "(f) ultralytics", "(g) ours"):
        assert row in out.stdout, out.stdout[-3000:]
    summary = json.loads((tmp_path / "b.json").read_text())
    assert len(summary["rows"]) == 7 and all(r["img_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in summary["rows"])
    assert set(summary["ratios"]) == {"fast_loader_vs_model_step (b/c)", "end_to_end_fast_vs_model_step (e/c)",
                                      "end_to_end_fast_vs_classic (e/d)"}
    model_step = next(r for r in summary["rows"] if r["row"].startswith("(c)"))
    assert 0 < model_step["mfu"] < 1 and model_step["warmup_s"] > 0
