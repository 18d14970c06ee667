"""One rule for every output path: never inside the data, equal to it or containing it (symlinks and
`..` resolved), refused in one line with exit 2 before anything is written; and --json-out replaces
only a JSON file that emotion-dist can prove it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_gray_clip

from emotion_dist.cli import main
from emotion_dist.utils.fsutil import DIGEST_KEY, json_written_by_us

RULE = "emotion-dist never writes inside the data"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def _astronaut() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


@pytest.fixture
def place(tmp_path, unit_checkpoint):
    """A data tree, a FER CSV alone in its folder and one in a busy folder, photos, a video, a
    checkpoint that records its data.root, and a symlink into the data tree."""
    from conftest import write_checkpoint

    data = tmp_path / "data"
    (data / "train/train/happy").mkdir(parents=True)
    (data / "train/train/happy/0.png").write_bytes(b"a face")
    (tmp_path / "fer").mkdir()
    (tmp_path / "fer/fer2013.csv").write_text("emotion,pixels,Usage\n")
    (tmp_path / "fer/fer2013new.csv").write_text("Usage,Image name\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home/fer2013.csv").write_text("emotion,pixels,Usage\n")
    (tmp_path / "home/notes.txt").write_text("my notes")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "me.png").write_bytes(_astronaut().read_bytes())
    (tmp_path / "clip.mp4").write_bytes(b"not really a video")
    (tmp_path / "link").symlink_to(data / "train")
    write_checkpoint(tmp_path / "ckpt/trained.pt", config={"data": {"root": str(data)}})
    return {"T": str(tmp_path), "D": str(data), "CK": str(unit_checkpoint),
            "TRAINED": str(tmp_path / "ckpt/trained.pt")}


# (case, argv with {T} tmp_path / {D} data.root / {CK} a checkpoint, the output as named, the data as named)
REFUSED = [
    ("run.dir inside data.root", ["train", "data.source=folder", "data.root={D}", "run.dir={D}/train/train/happy/run"],
     "run.dir={D}/train/train/happy/run", "data.root={D}"),
    ("run.dir is data.root", ["train", "data.source=folder", "data.root={D}", "run.dir={D}"],
     "run.dir={D}", "data.root={D}"),
    ("run.dir contains data.root", ["train", "data.source=folder", "data.root={D}", "run.dir={T}"], "run.dir={T}",
     "data.root={D}"),
    ("run.dir through a symlink", ["train", "data.source=folder", "data.root={D}", "run.dir={T}/link/run"],
     "run.dir={T}/link/run", "data.root={D}"),
    ("run.dir through ..", ["train", "data.source=folder", "data.root={D}", "run.dir={T}/photos/../data/run"],
     "run.dir={T}/photos/../data/run", "data.root={D}"),
    ("run.cache_dir is data.root", ["train", "data.source=folder", "data.root={D}", "run.cache_dir={D}"],
     "run.cache_dir={D}", "data.root={D}"),
    ("run.cache_dir inside data.root", ["train", "data.source=folder", "data.root={D}",
                                        "run.cache_dir={D}/train/train"],
     "run.cache_dir={D}/train/train", "data.root={D}"),
    ("run.cache_dir via data cache", ["data", "cache", "data.source=folder", "data.root={D}", "run.cache_dir={D}/c"],
     "run.cache_dir={D}/c", "data.root={D}"),
    ("run.dir inside the CSV's own folder", ["train", "data.source=fer2013_csv", "data.root={T}/fer/fer2013.csv",
                                             "run.dir={T}/fer/run"], "run.dir={T}/fer/run", "{T}/fer"),
    ("run.dir contains the CSV", ["train", "data.root={T}/home/fer2013.csv", "run.dir={T}/home"], "run.dir={T}/home",
     "data.root={T}/home/fer2013.csv"),
    ("run.dir contains data.ferplus", ["train", "data.source=fer2013_csv", "data.root={T}/home/fer2013.csv",
                                       "data.ferplus={T}/fer/fer2013new.csv", "run.dir={T}/fer"], "run.dir={T}/fer",
     "data.ferplus={T}/fer/fer2013new.csv"),
    ("train --json-out", ["train", "data.source=folder", "data.root={D}", "run.dir={T}/run", "--json-out",
                          "{D}/r.json"], "--json-out {D}/r.json", "data.root={D}"),
    ("data synthetic --json-out inside --out",
     ["data", "synthetic", "--out", "{T}/syn", "--json-out", "{T}/syn/r.json"],
     "--json-out {T}/syn/r.json", "--out {T}/syn"),
    ("evaluate --json-out", ["evaluate", "--checkpoint", "{CK}", "data.source=folder", "data.root={D}",
                             "run.cache_dir={T}/c", "--json-out", "{D}/train/r.json"], "--json-out {D}/train/r.json",
     "data.root={D}"),
    ("evaluate --out", ["evaluate", "--checkpoint", "{CK}", "data.source=folder", "data.root={D}",
                        "run.cache_dir={T}/c", "--out", "{T}/link/plots"], "--out {T}/link/plots", "data.root={D}"),
    ("evaluate run.cache_dir", ["evaluate", "--checkpoint", "{CK}", "data.source=folder", "data.root={D}",
                                "run.cache_dir={D}/cache"], "run.cache_dir={D}/cache", "data.root={D}"),
    ("bench --json-out", ["bench", "data.source=folder", "data.root={D}", "--json-out", "{D}/b.json"],
     "--json-out {D}/b.json", "data.root={D}"),
    ("bench --workdir", ["bench", "data.source=folder", "data.root={D}", "--workdir", "{D}/bench"],
     "run.dir={D}/bench/run", "data.root={D}"),
    ("export --out inside the data it was trained on", ["export", "--checkpoint", "{TRAINED}", "--format",
                                                        "safetensors", "--out", "{D}/m.safetensors"],
     "--out {D}/m.safetensors", "data.root={D}"),
    ("predict --out inside an input folder", ["predict", "--checkpoint", "{CK}", "{T}/photos", "--out",
                                              "{T}/photos/annotated"], "--out {T}/photos/annotated",
     "the input folder {T}/photos"),
    ("predict --out is an input folder", ["predict", "--checkpoint", "{CK}", "{T}/photos", "--out", "{T}/photos"],
     "--out {T}/photos", "the input folder {T}/photos"),
    ("predict --out is the folder of an input photo", ["predict", "--checkpoint", "{CK}", "{T}/photos/me.png",
                                                       "--out", "{T}/photos"], "--out {T}/photos",
     "the input {T}/photos/me.png"),
    ("predict --json-out inside an input folder", ["predict", "--checkpoint", "{CK}", "{T}/photos", "--json-out",
                                                   "{T}/photos/p.json"], "--json-out {T}/photos/p.json",
     "the input folder {T}/photos"),
    # a video's outputs, and a data folder given as a video's output file: inputs are named as such
    ("video --out is the input video", ["predict", "--checkpoint", "{CK}", "{T}/clip.mp4", "--out", "{T}/clip.mp4"],
     "--out {T}/clip.mp4", "is the input file itself"),
    ("video --csv through .. is the input video", ["predict", "--checkpoint", "{CK}", "{T}/clip.mp4", "--csv",
                                                   "{T}/photos/../clip.mp4"], "--csv {T}/photos/../clip.mp4",
     "is the input file itself"),
]


@pytest.mark.parametrize("case,argv,output,data", REFUSED, ids=[c[0] for c in REFUSED])
def test_an_output_in_the_data_is_refused_in_one_line_before_anything_is_written(case, argv, output, data, place,
                                                                                  tmp_path, capsys):
    before = _tree(tmp_path)
    code = main([a.format(**place) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert output.format(**place) in err[0] and data.format(**place) in err[0], err[0]
    assert RULE in err[0] or "is the input file itself" in data, err[0]
    assert _tree(tmp_path) == before, f"{case}: something was written"


ACCEPTED = [
    ("run.dir beside data.root", ["train", "--print-config", "data.source=folder", "data.root={D}", "run.dir={T}/run"]),
    ("run.dir in a busy folder that holds the CSV", ["train", "--print-config", "data.root={T}/home/fer2013.csv",
                                                     "run.dir={T}/home/run"]),
    ("synthetic default: data inside run.cache_dir", ["train", "--print-config", "run.cache_dir={T}/cache"]),
]


@pytest.mark.parametrize("case,argv", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_outputs_outside_the_data_are_accepted(case, argv, place, capsys):
    assert main([a.format(**place) for a in argv]) == 0, capsys.readouterr().err


def test_json_out_replaces_only_a_file_emotion_dist_can_prove_it_wrote(tmp_path, capsys):
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({"emotion_dist": "config keys", "my": "notes"}))
    assert main(["config", "keys", "data.root", "--json-out", str(theirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not written by emotion-dist" in err[0] and str(theirs) in err[0], err
    assert json.loads(theirs.read_text()) == {"emotion_dist": "config keys", "my": "notes"}

    ours = tmp_path / "ours.json"
    assert main(["config", "keys", "data.root", "--json-out", str(ours)]) == 0
    assert json_written_by_us(ours) and json.loads(ours.read_text())[DIGEST_KEY].startswith("hmac-sha256:")
    assert main(["config", "keys", "train.", "--json-out", str(ours)]) == 0  # ours: replaced
    assert any(k["key"].startswith("train.") for k in json.loads(ours.read_text())["keys"])

    edited = json.loads(ours.read_text())
    edited["keys"] = edited["keys"][:1]  # the user edited our report: theirs now
    ours.write_text(json.dumps(edited))
    assert main(["config", "keys", "--json-out", str(ours)]) == 2
    assert json.loads(ours.read_text()) == edited
    capsys.readouterr()


def test_predict_json_out_carries_the_proof_and_is_replaced_by_a_rerun(tmp_path, unit_checkpoint, capsys):
    out = tmp_path / "p.json"
    out.write_text(json.dumps({"emotion_dist": "predict", "faces": []}))  # looks like ours, no proof
    argv = ["predict", "--checkpoint", str(unit_checkpoint), str(_astronaut()), "--json-out", str(out)]
    assert main(argv) == 2
    out.unlink()
    assert main(argv) == 0 and json_written_by_us(out)
    assert main(argv) == 0 and json_written_by_us(out)
    capsys.readouterr()


def test_annotated_pngs_and_videos_are_replaced_only_when_their_digest_proves_them_ours(tmp_path, unit_checkpoint,
                                                                                        capsys):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from emotion_dist.inference.predict import MARK, png_written_by_us
    from emotion_dist.inference.video import mp4_written_by_us

    ann = tmp_path / "ann"
    ann.mkdir()
    png = ann / "astronaut_pred.png"
    info = PngInfo()
    info.add_text("Software", MARK)  # the mark alone, as a user's editor may have kept it
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    before = png.read_bytes()
    images = ["predict", "--checkpoint", str(unit_checkpoint), str(_astronaut()), "--out", str(ann)]
    assert main(images) == 2 and png.read_bytes() == before
    png.unlink()
    assert main(images) == 0 and png_written_by_us(png)
    assert main(images) == 0 and png_written_by_us(png)  # ours: replaced

    clip = write_gray_clip(tmp_path / "clip.mp4")
    out = tmp_path / "clip_pred.mp4"
    video = ["predict", "--checkpoint", str(unit_checkpoint), str(clip), "--no-detect", "--out", str(out)]
    assert main(video) == 0 and mp4_written_by_us(out)
    assert main(video) == 0 and mp4_written_by_us(out)  # ours: replaced
    edited = out.read_bytes()
    edited = edited[:100] + bytes([edited[100] ^ 1]) + edited[101:]  # one byte changed: the user's now
    out.write_bytes(edited)
    assert not mp4_written_by_us(out)
    assert main(video) == 2 and out.read_bytes() == edited
    capsys.readouterr()


def test_video_records_are_replaced_only_when_emotion_dist_recorded_them_as_its_own(tmp_path, unit_checkpoint,
                                                                                    monkeypatch, capsys):
    from emotion_dist.inference.video import CSV_COLUMNS, csv_written_by_us, jsonl_written_by_us

    monkeypatch.setenv("EMOTION_DIST_STATE_DIR", str(tmp_path / "state"))
    clip = write_gray_clip(tmp_path / "clip.mp4")
    jsonl, csv = tmp_path / "rec.jsonl", tmp_path / "rec.csv"
    theirs_jsonl = json.dumps({"frame": 0, "time": 0, "track": 1, "box": [0, 0, 1, 1], "label": "mine",
                               "probabilities": {}}) + "\n"
    theirs_csv = ",".join(CSV_COLUMNS) + ",my,columns\n1,2,3\n"
    jsonl.write_text(theirs_jsonl)  # the same keys and columns, written by someone else
    csv.write_text(theirs_csv)
    argv = ["predict", "--checkpoint", str(unit_checkpoint), str(clip), "--no-detect"]
    assert main([*argv, "--json-out", str(jsonl)]) == 2 and jsonl.read_text() == theirs_jsonl
    assert main([*argv, "--csv", str(csv)]) == 2 and csv.read_text() == theirs_csv
    jsonl.unlink()
    csv.unlink()
    for _ in range(2):  # the second run replaces the first one's files
        assert main([*argv, "--json-out", str(jsonl), "--csv", str(csv)]) == 0
        assert jsonl_written_by_us(jsonl) and csv_written_by_us(csv)
    assert list((tmp_path / "state" / "outputs").glob("*.json"))
    csv.write_text(csv.read_text() + "an edit\n")  # the user's now
    assert main([*argv, "--csv", str(csv)]) == 2 and csv.read_text().endswith("an edit\n")
    capsys.readouterr()
