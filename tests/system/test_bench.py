"""Smoke run of `emotion-dist bench` on tiny sizes, configured the way train is (key=value): it runs,
reports every row, and stdout holds only the JSON report with --json (no speed assertions)."""

import json
import math
import sys

import pytest
from conftest import run

pytestmark = pytest.mark.slow


def test_bench_takes_train_config_and_reports_every_row(tmp_path):
    out = run([sys.executable, "-m", "emotion_dist.cli", "bench", "data.synthetic_train=120", "data.synthetic_test=12",
               "data.image_size=32", "train.batch_size=8", "data.num_workers=0", f"run.cache_dir={tmp_path / 'cache'}",
               "--steps", "2", "--epochs", "1", "--ultralytics", "--workdir", str(tmp_path / "w"), "--json",
               "--json-out", str(tmp_path / "b.json")], timeout=600)
    summary = json.loads(out.stdout)  # nothing else on stdout: the table went to stderr
    assert summary == json.loads((tmp_path / "b.json").read_text())
    for row in ("(a) classic loader", "(b) fast loader", "(c) model step", "(d) end-to-end classic",
                "(e) end-to-end fast", "(f) ultralytics", "(g) ours"):
        assert row in out.stderr, out.stderr[-3000:]
    # the config reached the bench: 120 synthetic images (minus the validation share), 32 px, batch 8
    assert summary["data"]["image_size"] == 32 and summary["batch"] == 8 and 100 < summary["data"]["train_images"] < 120
    assert summary["timing"] == "perf_counter" and summary["steps"] == 2 and summary["warmup_steps"] == 2
    assert summary["adamw_fused"] is False  # foreach on the CPU; fused on CUDA
    assert len(summary["rows"]) == 7 and all(r["img_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in summary["rows"])
    assert set(summary["ratios"]) == {"fast_loader_vs_model_step (b/c)", "end_to_end_fast_vs_model_step (e/c)",
                                      "end_to_end_fast_vs_classic (e/d)"}
    model_step = next(r for r in summary["rows"] if r["row"].startswith("(c)"))
    assert 0 < model_step["mfu"] < 1 and model_step["first_step_s"] > 0 and model_step["warmup_s"] > 0
    assert summary["peak_source"].endswith("measured in this run")  # no known peak for a CPU
    # 1 - e/c: below 1 whenever (e) ran at all; two timed steps under a loaded suite say nothing of its sign
    assert math.isfinite(summary["input_share_of_step"]) and summary["input_share_of_step"] < 1


def test_bench_with_data_on_device_times_the_resident_path(tmp_path, monkeypatch, capsys):
    """In-process: with data.on_device=true every fast-pipeline batch bench times is gathered from
    the resident copy (DeviceSplit.gather), none on the host (loader.gather_uint8)."""
    from emotion_dist import cli
    from emotion_dist.data import augment, loader

    calls = {"resident": 0, "host": 0}
    resident_gather, host_gather = augment.DeviceSplit.gather, loader.gather_uint8

    def counted_resident(self, positions):
        calls["resident"] += 1
        return resident_gather(self, positions)

    def counted_host(split, positions):
        calls["host"] += 1
        return host_gather(split, positions)

    monkeypatch.setattr(augment.DeviceSplit, "gather", counted_resident)
    monkeypatch.setattr(loader, "gather_uint8", counted_host)
    out = tmp_path / "b.json"
    code = cli.main(["bench", "data.synthetic_train=120", "data.synthetic_test=12", "data.image_size=32",
                     "train.batch_size=8", "data.on_device=true", f"run.cache_dir={tmp_path / 'cache'}",
                     "--steps", "2", "--rows", "be", "--workdir", str(tmp_path / "w"), "--json-out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads(out.read_text())
    assert summary["data"]["on_device"] is True
    assert calls["resident"] > 0 and calls["host"] == 0, calls
