"""export --format hf: the Hugging Face folder, its model card, loading it back (from_pretrained,
--checkpoint DIR, an offline HF_HOME cache) and --push-to-hub with HfApi's upload calls recorded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lively import lively_checkpoint

from emotion_dist import cli
from emotion_dist.model import EmotionNet

TOKEN = "hf_unitTestSecretToken0123456789"


def astronaut() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def trainer_test_row(classes) -> dict:
    """A metrics.jsonl test record in the shape training/engine.py writes after its test pass."""
    per_class = {c: {"precision": round(0.5 + i / 20, 4), "recall": round(0.4 + i / 25, 4),
                     "f1": round(0.45 + i / 22, 4), "support": 10 + i} for i, c in enumerate(classes)}
    cm = [[per_class[c]["support"] if i == j else 0 for j in range(len(classes))] for i, c in enumerate(classes)]
    return {"time": 1.0, "type": "test", "step": 40, "checkpoint": "best.pt", "tta": "none", "loss": 1.2345,
            "accuracy": 0.6123, "macro_f1": 0.5789, "count": sum(m["support"] for m in per_class.values()),
            "per_class": per_class, "confusion_matrix": cm}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as training leaves it: checkpoints/best.pt, metrics.jsonl, confusion_test.png
    (read-only: the tests export from it into their own folders)."""
    from emotion_dist.config import Config
    from emotion_dist.data.readers.synthetic import CLASSES
    from emotion_dist.training.metrics import plot_confusion

    run = tmp_path_factory.mktemp("hub") / "run"
    cfg = Config().to_dict()
    lively_checkpoint(run / "checkpoints/best.pt", config=cfg, global_step=40, seed=5)
    row = trainer_test_row(list(CLASSES))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 1, "val_macro_f1": 0.5}) + "\n"
                                       + json.dumps(row) + "\n")
    plot_confusion(torch.tensor(row["confusion_matrix"]), list(CLASSES), run / "confusion_test.png", "test")
    return run


def export_hf(ckpt, out, *extra) -> int:
    return cli.main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(out), *extra])


def test_hf_folder_round_trip_is_bit_identical(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints/best.pt"
    assert export_hf(ckpt, tmp_path / "hf") == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "confusion_test.png"} <= files
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["in_channels"] == 1 and config["num_classes"] == 7 and config["label_names"][0] == "angry"
    assert config["pretrained_cfg"]["crop_margin"] == 0.15 and config["emotion_dist"]["checkpoint"]["image_size"] == 64
    model = EmotionNet.from_pretrained(tmp_path / "hf")
    ref = torch.load(ckpt, weights_only=True)["model_state_dict"]
    got = model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_predict_on_the_folder_equals_predict_on_the_pt(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints/best.pt"
    assert export_hf(ckpt, tmp_path / "hf") == 0
    docs = []
    for model, name in ((ckpt, "pt.json"), (tmp_path / "hf", "dir.json")):
        assert cli.main(["predict", "--checkpoint", str(model), str(astronaut()), "--json-out",
                         str(tmp_path / name)]) == 0
        docs.append(json.loads((tmp_path / name).read_text()))
    assert docs[0]["faces"] and docs[0]["faces"] == docs[1]["faces"]


def test_model_card_holds_the_runs_test_figures(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    assert export_hf(run_dir / "checkpoints/best.pt", tmp_path / "hf", "--license", "mit") == 0
    row = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    card = ModelCard.load(tmp_path / "hf/README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "emotion-dist" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "mit"
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": row["accuracy"], "f1": row["macro_f1"]}
    for c, m in row["per_class"].items():
        assert f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |" in card.text
    assert "read once" in card.text and "![Confusion matrix" in card.text and "widen the box by 15%" in card.text
    assert "from_pretrained" in card.text and "Intended use and limitations" in card.text


def test_the_folder_is_refused_over_a_folder_emotion_dist_did_not_write(unit_checkpoint, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    assert export_hf(unit_checkpoint, tmp_path / "mine") == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def test_from_pretrained_by_repo_id_from_an_offline_hf_home_cache(run_dir, tmp_path, monkeypatch):
    """The cache laid out as huggingface_hub lays it: models--owner--name/{refs/main, snapshots/REV/}."""
    import huggingface_hub.constants as hc

    assert export_hf(run_dir / "checkpoints/best.pt", tmp_path / "hf") == 0
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--someone--emotionnet"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "hf", repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(rev)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))  # read at import; the variables above for children
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = EmotionNet.from_pretrained("someone/emotionnet")
    ref = EmotionNet.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


class Recorder:
    """Stands in for the Hub (unreachable from here): HfApi's create_repo and upload_folder."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch):
        from huggingface_hub import HfApi

        recorder = self

        def create_repo(self, repo_id, **kw):
            recorder.calls.append(("create_repo", repo_id, kw, self.token))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kw):
            files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
            recorder.calls.append(("upload_folder", repo_id, {**kw, "files": files}, self.token))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_the_folder_and_writes_no_token(run_dir, tmp_path, monkeypatch, capsys):
    rec = Recorder().install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert export_hf(run_dir / "checkpoints/best.pt", tmp_path / "hf", "--push-to-hub", "someone/emotionnet",
                     "--private") == 0
    out = capsys.readouterr()
    (create, repo_id, kw, token), (upload, repo_id2, up, token2) = rec.calls
    assert (create, upload, repo_id, repo_id2) == ("create_repo", "upload_folder", "someone/emotionnet",
                                                   "someone/emotionnet")
    assert kw["private"] is True and token == token2 == TOKEN
    assert {"README.md", "config.json", "model.safetensors", "confusion_test.png"} <= set(up["files"])
    assert TOKEN not in out.out + out.err
    for f in list(tmp_path.rglob("*")):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_push_without_a_token_is_refused_before_any_work(unit_checkpoint, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    rec = Recorder().install(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert export_hf(unit_checkpoint, tmp_path / "hf", "--push-to-hub", "someone/emotionnet") == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists() and rec.calls == []


def test_evaluate_on_the_folder_equals_evaluate_on_the_pt(tiny_data, tmp_path):
    from emotion_dist.config import Config

    cfg = Config()
    cfg.data.source, cfg.data.root, cfg.data.image_size = "folder", str(tiny_data), 32
    cfg.run.cache_dir = str(tmp_path / "cache")
    ckpt = lively_checkpoint(tmp_path / "run/checkpoints/best.pt", image_size=32, config=cfg.to_dict())
    assert export_hf(ckpt, tmp_path / "hf") == 0
    reports = []
    for model, name in ((ckpt, "pt"), (tmp_path / "hf", "dir")):
        out = tmp_path / f"{name}.json"
        assert cli.main(["evaluate", "--checkpoint", str(model), "--json-out", str(out), "--out",
                         str(tmp_path / f"eval-{name}")]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["count"] == 63 and len({tuple(r) for r in reports[0]["confusion_matrix"]}) > 1
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert reports[0][key] == reports[1][key]
