"""The FER protocol pieces: fer2013.csv / icml_face_data.csv and FER+ readers, label modes,
class mapping, the leak audit, the balanced sampler, ten-crop TTA, ensembles and
the summary over seeds. Small CSVs written in exactly the files' formats; everything in-process and fast."""

import json
import logging
import statistics

import numpy as np
import pytest
import torch
from fer_files import FER_HEADER, ICML_HEADER, pixels, write_fer

from emotion_dist.cli import main as cli_main
from emotion_dist.config import ConfigError, load_config
from emotion_dist.data import audit as A
from emotion_dist.data.labels import class_mapping, draw_labels, remap_head, remap_probabilities
from emotion_dist.data.readers.fer import FER_CLASSES, FERPLUS_CLASSES, FERPLUS_HEADER, ferplus_label, read_fer_csv
from emotion_dist.data.sampler import BalancedSampler, ResumableSampler
from emotion_dist.errors import DataError
from emotion_dist.inference import tta


def face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)


def fives(n: int) -> str:
    return " ".join(["5"] * n)


# 9 good rows: 5 Training, 2 PublicTest, 2 PrivateTest (ids 0-8), then the bad ones with their reasons
GOOD = [(i % 7, face(i), u) for i, u in enumerate(["Training"] * 5 + ["PublicTest"] * 2 + ["PrivateTest"] * 2)]
BAD = [
    (("3", fives(2303), "Training"), "2303 pixel values, expected 2304"),
    (("3", "5 x " + fives(2302), "Training"), "a pixel value is not an integer"),
    (("3", "12.5 " + fives(2303), "Training"), "a pixel value is not an integer"),
    (("3", "256 " + fives(2303), "Training"), "outside 0-255"),
    (("1", "-1 " + fives(2303), "PrivateTest"), "outside 0-255"),
    (("2", fives(2304), "Validation"), "Usage 'Validation' is not Training, PublicTest or PrivateTest"),
    (("7", fives(2304), "Training"), "label 7 is out of range 0-6"),
    (("a", fives(2304), "PublicTest"), "label 'a' is not an integer 0-6"),
    ("3," + fives(2304), "2 fields, expected 3"),
]


def fer_rows():
    return [(str(e), pixels(img), u) for e, img, u in GOOD] + [row for row, _ in BAD]


def test_fer2013_and_icml_splits_labels_ids_and_bad_rows(tmp_path, caplog):
    for header, name in ((FER_HEADER, "fer2013.csv"), (ICML_HEADER, "icml_face_data.csv")):
        path = write_fer(tmp_path / name, fer_rows(), header)
        with caplog.at_level(logging.WARNING, logger="emotion_dist"):
            caplog.clear()
            d = read_fer_csv(path)
        assert d.kind == name and d.classes == FER_CLASSES
        assert {s: len(v) for s, v in d.splits.items()} == {"train": 5, "val": 2, "test": 2}
        tr = d.splits["train"]
        assert tr.images.shape == (5, 1, 48, 48) and tr.images.dtype == np.uint8
        assert tr.ids.tolist() == [0, 1, 2, 3, 4] and d.splits["test"].ids.tolist() == [7, 8]
        assert tr.labels.tolist() == [0, 1, 2, 3, 4] and d.splits["val"].labels.tolist() == [5, 6]
        assert all(np.array_equal(d.splits["val"].images[k, 0], GOOD[5 + k][1]) for k in range(2))
        assert tr.targets is None
        # one skipped entry and one log line per bad row, naming the file line (header = line 1)
        assert [w for w, _ in d.skipped] == [f"{name} line {11 + k}" for k in range(len(BAD))]
        for (_, why), (_, expected) in zip(d.skipped, BAD):
            assert expected in why
        lines = [r.getMessage() for r in caplog.records if "skipped bad row" in r.getMessage()]
        assert len(lines) == len(BAD) and all("\n" not in m for m in lines)


def test_a_file_of_another_format_is_one_line_naming_the_headers(tmp_path):
    wrong = write_fer(tmp_path / "labels.csv", fer_rows()[:2], header="label,pixels,Usage")
    with pytest.raises(DataError) as e:
        read_fer_csv(wrong)
    msg = str(e.value)
    assert "\n" not in msg and "'emotion,pixels,Usage'" in msg and "'emotion, Usage, pixels'" in msg
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00" * 10)
    for bad in ("empty.csv", "binary.csv", "missing.csv"):
        with pytest.raises(DataError, match="emotion,pixels,Usage"):
            read_fer_csv(tmp_path / bad)
    with pytest.raises(DataError, match="needs FER\\+ votes"):
        read_fer_csv(tmp_path / "labels.csv", label_mode="crossentropy")


# ---------------------------------------------------------------- FER+
def votes(**kw) -> list[int]:
    return [kw.get(c, 0) for c in FERPLUS_CLASSES + ["unknown", "NF"]]


# (Usage, image name or "", votes, expected: {mode: (label, distribution) or None})
PLUS = [
    ("Training", "fer0000000.png", votes(neutral=10)),
    ("Training", "fer0000001.png", votes(happiness=6, surprise=4)),
    ("Training", "fer0000002.png", votes(neutral=5, sadness=5)),  # tie: no majority; soft keeps both
    ("Training", "fer0000003.png", votes(unknown=6, neutral=4)),  # unknown first: dropped everywhere
    ("Training", "", votes(NF=10)),  # an image FER+ dropped
    ("Training", "fer0000005.png", votes(neutral=5, happiness=1, surprise=1, sadness=1, anger=1, disgust=1)),
    ("Training", "fer0000006.png", votes(anger=4, sadness=3, fear=3)),  # no majority; soft: three emotions
    ("Training", "fer0000007.png", votes(contempt=6, neutral=4)),
    ("PublicTest", "fer0000008.png", votes(neutral=5, sadness=5)),  # val: majority rule in every mode
    ("PublicTest", "fer0000009.png", votes(surprise=8, fear=2)),
    ("PrivateTest", "fer0000010.png", votes(disgust=7, anger=3)),
    ("PrivateTest", "fer0000011.png", votes(NF=6, fear=4)),
    ("Training", "fer0000012.png", None),  # votes that do not parse
]
N, H, S, SA, AN, D, FE, C = range(8)
EXPECT_TRAIN = {
    "majority": {0: (N, {N: 1}), 1: (H, {H: 1}), 5: (N, {N: 1}), 7: (C, {C: 1})},
    "crossentropy": {0: (N, {N: 1}), 1: (H, {H: .6, S: .4}), 2: (N, {N: .5, SA: .5}), 5: (N, {N: 1}),
                     6: (AN, {AN: .4, SA: .3, FE: .3}), 7: (C, {C: .6, N: .4})},
}
EXPECT_TRAIN["probability"] = EXPECT_TRAIN["crossentropy"]


def write_ferplus(path, rows=PLUS, header=",".join(FERPLUS_HEADER)):  # noqa: B008  (a str of a constant, built once)
    lines = [header]
    for usage, name, v in rows:
        lines.append(f"{usage},{name}," + (",".join(map(str, v)) if v is not None else "4,x,0,0,0,0,0,0,0,0"))
    path.write_text("\n".join(lines) + "\n")
    return path


def plus_pair(tmp_path):
    rows = [(str(k % 7), pixels(face(k)), u) for k, (u, _, _) in enumerate(PLUS)]
    rows[3] = ("3", fives(100), "Training")  # a bad fer2013.csv row: its FER+ row goes with it
    fer = write_fer(tmp_path / "fer2013.csv", rows)
    return fer, write_ferplus(tmp_path / "fer2013new.csv")


@pytest.mark.parametrize("mode", ["majority", "probability", "crossentropy"])
def test_ferplus_label_modes(tmp_path, mode):
    fer, plus = plus_pair(tmp_path)
    d = read_fer_csv(fer, plus, mode)
    assert d.classes == FERPLUS_CLASSES and len(d.classes) == 8
    tr = d.splits["train"]
    want = EXPECT_TRAIN[mode]
    assert tr.ids.tolist() == sorted(want)
    assert tr.labels.tolist() == [want[i][0] for i in sorted(want)]
    for k, i in enumerate(tr.ids.tolist()):  # joined row by row, past the bad row
        assert np.array_equal(tr.images[k, 0], face(i))
    if mode == "majority":
        assert tr.targets is None
    else:
        expected = np.zeros((len(want), 8), np.float32)
        for r, i in enumerate(sorted(want)):
            for c, p in want[i][1].items():
                expected[r, c] = p
        np.testing.assert_allclose(tr.targets, expected, atol=1e-6)
    # validation and test use the majority label whatever the training mode
    assert d.splits["val"].ids.tolist() == [9] and d.splits["val"].labels.tolist() == [S]
    assert d.splits["test"].ids.tolist() == [10] and d.splits["test"].labels.tolist() == [D]
    assert d.excluded["dropped by FER+"] == 1 and d.excluded["majority NF"] == 1
    assert [w for w, _ in d.skipped] == ["fer2013.csv line 5", "fer2013new.csv line 14"]
    assert "100 pixel values" in d.skipped[0][1] and "vote count is not an integer" in d.skipped[1][1]


def test_ferplus_majority_follows_the_reference_rules():
    assert ferplus_label(np.array(votes(neutral=5, sadness=5)), "majority") == (None, "no majority")
    assert ferplus_label(np.array(votes(unknown=6, neutral=4)), "majority") == (None, "majority unknown")
    t, _ = ferplus_label(np.array(votes(fear=3, anger=1, sadness=1, happiness=1)), "majority")
    assert t is not None and t[FE] == 1  # single votes are outliers: 3 of the 3 that remain
    assert ferplus_label(np.array(votes(fear=2, anger=2, sadness=2, happiness=2, NF=2)), "crossentropy")[0] is None


def test_ferplus_join_errors_are_one_line(tmp_path):
    fer, _ = plus_pair(tmp_path)
    short = write_ferplus(tmp_path / "short.csv", PLUS[:-1])
    with pytest.raises(DataError, match="row by row") as e:
        read_fer_csv(fer, short)
    assert "\n" not in str(e.value)
    long = write_ferplus(tmp_path / "long.csv", PLUS + [PLUS[0]])
    with pytest.raises(DataError, match="more rows"):
        read_fer_csv(fer, long)
    shifted = write_ferplus(tmp_path / "shifted.csv", [("PublicTest",) + PLUS[0][1:]] + PLUS[1:])
    with pytest.raises(DataError, match="not row-aligned"):
        read_fer_csv(fer, shifted)
    header = write_ferplus(tmp_path / "header.csv", header="Usage,Image name,neutral,happy")
    with pytest.raises(DataError, match="Usage,Image name,neutral,happiness"):
        read_fer_csv(fer, header)


def test_probability_mode_draws_are_pure_and_follow_the_votes():
    targets = torch.tensor([[0.0, 0.6, 0.4, 0, 0, 0, 0, 0], [0.5, 0, 0, 0.5, 0, 0, 0, 0]]).repeat(4000, 1)
    keys = torch.arange(len(targets))
    a = draw_labels(targets, keys, seed=1, epoch=0)
    assert torch.equal(a, draw_labels(targets, keys, 1, 0))  # pure
    assert torch.equal(a[[7, 4001]], draw_labels(targets[[7, 4001]], keys[[7, 4001]], 1, 0))  # per key, not per batch
    assert not torch.equal(a, draw_labels(targets, keys, 1, 1))  # a new draw each epoch
    first, second = a[0::2], a[1::2]
    assert set(first.tolist()) == {1, 2} and set(second.tolist()) == {0, 3}  # never a zero-vote class
    assert abs((first == 1).float().mean().item() - 0.6) < 0.03
    assert abs((second == 0).float().mean().item() - 0.5) < 0.03


def test_class_mapping_fer_to_ferplus_head_and_probabilities():
    m = class_mapping(FER_CLASSES, FERPLUS_CLASSES)
    assert m == [6, 3, 5, 4, 0, 1, 2, None]
    assert class_mapping(FERPLUS_CLASSES, FER_CLASSES) == [4, 5, 6, 1, 3, 2, 0]
    src = {"classify.linear.weight": torch.arange(7.0)[:, None].repeat(1, 3), "classify.linear.bias": torch.arange(7.0),
           "backbone.0.w": torch.ones(2)}
    own = {"classify.linear.weight": torch.full((8, 3), -1.0), "classify.linear.bias": torch.full((8,), -1.0),
           "backbone.0.w": torch.zeros(2)}
    out = remap_head(src, own, src_classes=FER_CLASSES, dst_classes=FERPLUS_CLASSES)
    assert out["classify.linear.bias"].tolist() == [6, 3, 5, 4, 0, 1, 2, -1]  # contempt keeps its fresh row
    assert out["classify.linear.weight"][1].tolist() == [3, 3, 3] and out["backbone.0.w"] is src["backbone.0.w"]
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.1, 0.1, 0.2]])
    assert remap_probabilities(probs, m)[0].tolist() == pytest.approx([0.2, 0.3, 0.1, 0.1, 0.1, 0.0, 0.2, 0.0])


# ---------------------------------------------------------------- leak audit
def blocky(n: int, seed: int) -> np.ndarray:
    """Distinct images with structure at several scales (unlike i.i.d. noise, which pHash ignores)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 12, 12)).astype(np.float32)
    x = np.repeat(np.repeat(base, 4, 2), 4, 3) + rng.normal(0, 6, (n, 1, 48, 48))
    return np.clip(x, 0, 255).astype(np.uint8)


def test_audit_finds_planted_duplicates_and_drop_removes_them():
    train, val, test = blocky(400, 0), blocky(60, 1), blocky(60, 2)
    val[3] = train[10]  # exact, train-val
    test[0] = train[20]  # exact, train-test
    test[1] = np.clip(train[30].astype(int) + 12, 0, 255)  # brighter copy: near, train-test
    val[7] = np.clip(train[40].astype(float) * 0.9 + 10, 0, 255).astype(np.uint8)  # contrast: near, train-val
    test[2] = val[5]  # exact, val-test
    ids = {"train": np.arange(400) + 1000, "val": np.arange(60) + 2000, "test": np.arange(60) + 3000}
    r = A.audit({"train": train, "val": val, "test": test}, ids)
    p = r.report["pairs"]
    assert p["train-val"]["exact"]["pairs"] == 1 and p["train-val"]["exact"]["examples"] == [[1010, 2003]]
    assert p["train-test"]["exact"]["pairs"] == 1 and p["val-test"]["exact"]["pairs"] == 1
    assert p["train-test"]["near"]["pairs"] == 1 and p["train-test"]["near"]["examples"][0][:2] == [1030, 3001]
    assert p["train-val"]["near"]["pairs"] == 1 and p["val-test"]["near"]["pairs"] == 0
    assert r.leaked_train.tolist() == [10, 20, 30, 40]
    kept = A.dedupe(r, 400, "drop")
    assert len(kept) == 396 and not set(kept.tolist()) & {10, 20, 30, 40}
    assert r.report["train_dropped"] == 4 and json.loads(json.dumps(r.report)) == r.report
    line = r.summary_line()
    assert "\n" not in line and "exact train-val 1, train-test 1, val-test 1" in line and "removed 4" in line
    assert A.dedupe(r, 400, "warn").tolist() == list(range(400)) and r.report["train_dropped"] == 0
    clean = A.audit({"train": blocky(400, 5), "val": blocky(60, 6), "test": blocky(60, 7)})
    assert clean.report["train_leaked"] == 0  # no false pairs among distinct images


def test_near_duplicate_thresholds_are_what_the_report_states():
    img = blocky(1, 3)
    h, unit = A.fingerprints(np.concatenate([img, np.clip(img.astype(int) + 12, 0, 255).astype(np.uint8),
                                             img[..., ::-1]]))
    assert int(np.bitwise_count(h[0] ^ h[1])) <= A.NEAR_MAX_HAMMING and float(unit[0] @ unit[1]) >= A.NEAR_MIN_CORR
    assert int(np.bitwise_count(h[0] ^ h[2])) > A.NEAR_MAX_HAMMING  # a mirrored face is another image


# ---------------------------------------------------------------- balanced sampler
LABELS = np.repeat(np.arange(5), [300, 12, 90, 60, 38])  # 500 images, a 25:1 imbalance


def _epoch(sampler_cls, world, epoch=0, **kw):
    """The whole epoch's global draw order, rebuilt from every rank's plan."""
    plans = [sampler_cls(LABELS, 8, world, r, seed=3, **kw) for r in range(world)]
    for s in plans:
        s.set_epoch(epoch)
    steps = [s.plan() for s in plans]
    out = []
    for k in range(len(steps[0])):
        for j in range(len(steps[0][k].micro_batches)):
            out += [m for r in range(world) for m in steps[r][k].micro_batches[j][:steps[r][k].real[j]].tolist()]
    return out


def test_balanced_sampler_draws_classes_equally():
    counts = np.zeros(5)
    for epoch in range(4):
        order = _epoch(BalancedSampler, 1, epoch)
        assert len(order) == 500 and len(set(order)) < 500  # with replacement
        counts += np.bincount(LABELS[order], minlength=5)
    expected = counts.sum() / 5
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    uniform = np.bincount(LABELS[_epoch(lambda lab, *a, **k: ResumableSampler(len(lab), *a, **k), 1)], minlength=5)
    assert ((uniform - 100) ** 2 / 100).sum() > 100  # the permutation keeps the imbalance


@pytest.mark.parametrize("world,resume_world", [(1, 1), (1, 2), (2, 2), (2, 1)])
def test_balanced_sampler_resumes_mid_epoch_exactly(world, resume_world):
    full = _epoch(BalancedSampler, 1, epoch=2)
    assert _epoch(BalancedSampler, 2, epoch=2) == full  # the same global order on any world size
    first = [BalancedSampler(LABELS, 8, world, r, seed=3, grad_accum=2) for r in range(world)]
    done = []
    for s in first:
        s.set_epoch(2)
    plans = [s.plan() for s in first]
    for k in range(5):  # five steps, then a "checkpoint"
        for j in range(2):
            done += [m for r in range(world) for m in plans[r][k].micro_batches[j][:plans[r][k].real[j]].tolist()]
        for r, s in enumerate(first):
            s.advance(plans[r][k])
    state = first[0].state_dict()
    rest = [BalancedSampler(LABELS, 8, resume_world, r, seed=0, grad_accum=2) for r in range(resume_world)]
    for s in rest:
        s.load_state_dict(state)
    tail = [s.plan() for s in rest]
    for k in range(len(tail[0])):
        for j in range(len(tail[0][k].micro_batches)):
            done += [m for r in range(resume_world) for m in tail[r][k].micro_batches[j][:tail[r][k].real[j]].tolist()]
    assert done == full  # nothing repeated, nothing skipped, same order


def test_balanced_draw_keys_are_unique_per_draw():
    s = BalancedSampler(LABELS, 8, 2, 1, seed=3)
    steps = s.plan()
    keys = torch.cat([k[:r] for st in steps for k, r in zip(st.keys, st.real)])
    positions = torch.cat([st.real_positions() for st in steps])
    assert len(set(keys.tolist())) == len(keys) and len(set(positions.tolist())) < len(positions)
    assert ResumableSampler(500, 8, 2, 1, seed=3).plan()[0].keys is None


# ---------------------------------------------------------------- TTA and ensembles
class Quadrants(torch.nn.Module):
    """logits = mean brightness of the four quadrants: crops and mirrors change them predictably."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return torch.stack([x[..., :h, :w].mean((1, 2, 3)), x[..., :h, w:].mean((1, 2, 3)),
                            x[..., h:, :w].mean((1, 2, 3)), x[..., h:, w:].mean((1, 2, 3))], 1)


def test_tencrop_and_flip_match_a_hand_computation():
    x = torch.from_numpy(np.stack([face(1), face(2)])[:, None])
    prep = lambda v: v.float() / 64  # noqa: E731
    model = Quadrants()
    crops = [x[..., :40, :40], x[..., :40, 8:], x[..., 8:, :40], x[..., 8:, 8:], x[..., 4:44, 4:44]]
    views = crops + [c.flip(-1) for c in crops]
    hand = sum(model(prep(v)).softmax(1) for v in views) / 10
    assert torch.allclose(tta.probabilities(model, x, prep, "tencrop"), hand, atol=1e-6)
    flip = (model(prep(x)).softmax(1) + model(prep(x.flip(-1))).softmax(1)) / 2
    assert torch.allclose(tta.probabilities(model, x, prep, "flip"), flip, atol=1e-6)
    assert torch.allclose(tta.probabilities(model, x, prep, "none"), model(prep(x)).softmax(1))
    assert tta.crop_size(48) == 40 and tta.crop_size(96) == 80
    assert "40x40 of 48x48" in tta.describe("tencrop", 48, 96) and "96x96" in tta.describe("tencrop", 48, 96)


def test_tencrop_views_scale_to_the_input_size_through_the_eval_transform():
    from emotion_dist.data.augment import BatchTransform

    t = BatchTransform(1, 64, torch.device("cpu"), seed=0)
    x = torch.from_numpy(np.stack([face(3)])[:, None])
    seen = []
    tta.probabilities(lambda v: seen.append(v.shape) or torch.zeros(len(v), 3), x, t.eval, "tencrop")
    assert seen == [torch.Size([1, 1, 64, 64])] * 10


def test_ensemble_averages_model_probabilities():
    x = torch.from_numpy(np.stack([face(4), face(5)])[:, None])
    prep = lambda v: v.float() / 64  # noqa: E731
    a, b = Quadrants(), lambda v: -Quadrants()(v)
    hand = (Quadrants()(prep(x)).softmax(1) + (-Quadrants()(prep(x))).softmax(1)) / 2
    assert torch.allclose(tta.ensemble([a, b], x, prep), hand, atol=1e-6)
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    q = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    assert torch.allclose(tta.average([p, q]), torch.tensor([[0.4, 0.6], [0.3, 0.7]]))


# ---------------------------------------------------------------- summary over seeds
def _run(tmp_path, name, seed, acc, f1, count=3589):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
    (d / "metrics.jsonl").write_text(
        json.dumps({"type": "epoch", "epoch": 1, "val_accuracy": 0.1}) + "\n"
        + json.dumps({"type": "test", "checkpoint": "best.pt", "loss": 1.0, "accuracy": 0.1,
                      "macro_f1": 0.1, "count": count}) + "\n"
        + '{"type": "te' + "\n"  # a line torn by a crash
        + json.dumps({"type": "test", "checkpoint": "best.pt", "loss": 1.0, "accuracy": acc,
                      "macro_f1": f1, "count": count}) + "\n")
    return d


def test_seed_summary_mean_and_std(tmp_path, capsys):
    runs = [_run(tmp_path, f"seed{i}", i, acc, f1)
            for i, (acc, f1) in enumerate([(0.70, 0.60), (0.72, 0.65), (0.71, 0.61)])]
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"split": "test", "tta": "none", "accuracy": 0.73, "macro_f1": 0.66, "count": 3589}))
    assert cli_main(["summarize", *map(str, runs), str(report), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    accs, f1s = [0.70, 0.72, 0.71, 0.73], [0.60, 0.65, 0.61, 0.66]
    assert s["n"] == 4 and [r["seed"] for r in s["runs"]] == [0, 1, 2, None]
    assert s["accuracy"]["mean"] == pytest.approx(statistics.mean(accs))
    assert s["accuracy"]["std"] == pytest.approx(statistics.stdev(accs))
    assert s["macro_f1"]["std"] == pytest.approx(statistics.stdev(f1s))
    assert cli_main(["summarize", *map(str, runs)]) == 0
    table = capsys.readouterr().out
    assert f"{100 * statistics.mean(accs[:3]):.2f} ± {100 * statistics.stdev(accs[:3]):.2f}" in table
    one = cli_main(["summarize", str(runs[0]), "--json"])
    assert one == 0 and json.loads(capsys.readouterr().out)["accuracy"]["std"] is None
    other = _run(tmp_path, "other", 9, 0.5, 0.5, count=3000)
    assert cli_main(["summarize", str(runs[0]), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in count" in err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.jsonl").write_text(json.dumps({"type": "epoch"}) + "\n")
    assert cli_main(["summarize", str(tmp_path / "unfinished")]) == 2
    assert "no test record" in capsys.readouterr().err


# ---------------------------------------------------------------- config keys
def test_config_keys_for_the_fer_protocol():
    cfg, _ = load_config(None, [])
    assert (cfg.data.ferplus, cfg.data.label_mode,
            cfg.data.dedupe, cfg.train.sampler) == (None, "majority", "warn", "uniform")
    cfg, _ = load_config(None, ["data.source=fer2013_csv", "data.root=x.csv", "data.ferplus=y.csv",
                                "data.label_mode=crossentropy", "data.dedupe=off", "train.sampler=balanced"])
    assert (cfg.data.dedupe, cfg.train.sampler) == ("off", "balanced")
    with pytest.raises(ConfigError, match="needs FER\\+ votes"):
        load_config(None, ["data.source=fer2013_csv", "data.root=x.csv", "data.label_mode=probability"])
    with pytest.raises(ConfigError, match="allowed: off, warn, drop"):
        load_config(None, ["data.dedupe=maybe"])
    with pytest.raises(ConfigError, match="data.source=fer2013_csv"):
        load_config(None, ["data.ferplus=y.csv"])
