"""A trained model as a Hugging Face model folder, and its upload to the Hub.

`write_hf_folder` turns a checkpoint into what `PyTorchModelHubMixin.save_pretrained` writes
(config.json with the constructor's arguments, model.safetensors) plus what a stranger needs to use
it: class names, the preprocessing recipe and the checkpoint metadata in config.json (timm's
`label_names` / `pretrained_cfg` keys, and emotion-dist's own block that modelio reads back), and a
model card (README.md) with the run's own test figures from metrics.jsonl and its confusion matrix.
`push_folder` uploads such a folder with HfApi; the token is read, never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from emotion_dist import __version__
from emotion_dist.errors import ConfigError
from emotion_dist.inference.predict import preprocessing_recipe, recipe_sentence
from emotion_dist.modelio import load_checkpoint, model_from_state, model_meta, read_meta
from emotion_dist.utils.fsutil import atomic_write_text

CONFUSION_PNG = "confusion_test.png"
DATASET_NAMES = {"kaggle": "FER2013 (Kaggle layout)", "fer2013_csv": "FER2013 (fer2013.csv)",
                 "synthetic": "emotion-dist synthetic faces", "folder": "a folder of face images"}


def is_hf_folder_ours(path: Path) -> bool:
    """A folder this module wrote: its config.json carries the emotion_dist block."""
    try:
        return "emotion_dist" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_hf_out(out: Optional[str], checkpoint: str) -> Path:
    """Before any work: the folder must be new, empty, or one `export --format hf` wrote."""
    path = Path(out) if out else Path(checkpoint).resolve().parent / (Path(checkpoint).stem + "-hf")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; --format hf writes a folder (config.json, model.safetensors, "
                          f"README.md): give a new folder name")
    if path.is_dir() and any(path.iterdir()) and not is_hf_folder_ours(path):
        raise ConfigError(f"--out {path} is a folder that emotion-dist did not write; give a new or empty folder")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the folder {path.parent} does not exist; create it or choose another path")
    return path


def run_dir_of(checkpoint: str | os.PathLike) -> Optional[Path]:
    """RUN_DIR for RUN_DIR/checkpoints/NAME.pt, else None (a file copied elsewhere)."""
    p = Path(checkpoint).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else None


def read_test_rows(run_dir: Optional[Path]) -> list[dict]:
    """The test records of a run's metrics.jsonl (the trainer's single test pass on best.pt)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a full disk: the others still count
        if isinstance(r, dict) and r.get("type") == "test":
            rows.append(r)
    return rows


def hf_config(state: dict, path: str) -> dict:
    """config.json: the mixin's constructor arguments, timm's keys, and emotion-dist's block."""
    meta = read_meta(state, path)
    sidecar = model_meta(meta)
    data = meta.config.get("data", {})
    recipe = preprocessing_recipe(sidecar, meta.config)
    return {
        "in_channels": meta.in_channels, "num_classes": len(meta.classes),  # EmotionNet(**these)
        "architecture": "EmotionNet", "label_names": list(meta.classes),
        "pretrained_cfg": {"input_size": [meta.in_channels, meta.image_size, meta.image_size],
                           "mean": meta.normalization["mean"], "std": meta.normalization["std"],
                           "interpolation": "bilinear", "data_size": meta.data_size,
                           "crop_margin": recipe["crop_margin"], "alignment": recipe["alignment"],
                           "channel_order": recipe["channel_order"]},
        "emotion_dist": {
            "version": __version__,
            "weights": "ema" if state.get("ema_state_dict") else "model",
            "data": {"source": data.get("source"), "root": data.get("root"), "label_mode": meta.label_mode,
                     "ferplus": data.get("ferplus"), "val_fraction": data.get("val_fraction"),
                     "fit": data.get("fit"), "face_crop": data.get("face_crop")},
            "preprocessing": recipe,
            "checkpoint": meta.to_state(),  # what modelio.read_hf_folder gives back as a checkpoint's state
        },
    }


def write_hf_folder(checkpoint: str, out: Path, *, license: str = "unknown") -> Path:
    """The folder, built in a temporary sibling and moved into place whole."""
    state = load_checkpoint(checkpoint)
    model = model_from_state(state, checkpoint)
    config = hf_config(state, checkpoint)
    run_dir = run_dir_of(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, config=config)
        png = run_dir / CONFUSION_PNG if run_dir else None
        has_png = bool(png and png.is_file())
        if has_png:
            shutil.copyfile(png, tmp / CONFUSION_PNG)
        card = model_card(config, state, read_test_rows(run_dir), license=license, has_confusion=has_png)
        atomic_write_text(tmp / "README.md", str(card))
        if out.exists():  # ours (check_hf_out): replaced whole, never merged
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(config: dict, state: dict, test_rows: list[dict], *, license: str, has_confusion: bool):
    """README.md: YAML front matter (ModelCardData, model-index from EvalResult) and a body with the
    run's test figures, the split, the training settings, use and limits, and an example."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    ed = config["emotion_dist"]
    cfg = ed["checkpoint"].get("config", {})
    data, train = cfg.get("data", {}), cfg.get("train", {})
    source = data.get("source") or "unknown"
    dataset_name = DATASET_NAMES.get(source, source)
    test = test_rows[-1] if test_rows else None
    evals = []
    if test:
        common = dict(task_type="image-classification", task_name="Facial expression recognition",
                      dataset_type=source, dataset_name=dataset_name, dataset_split="test")
        evals = [EvalResult(metric_type="accuracy", metric_value=test["accuracy"], **common),
                 EvalResult(metric_type="f1", metric_name="macro-F1", metric_value=test["macro_f1"],
                            metric_config="macro", **common)]
    datasets = [data["kaggle_handle"]] if source == "kaggle" and data.get("kaggle_handle") else None
    card_data = ModelCardData(library_name="emotion-dist", pipeline_tag="image-classification", license=license,
                              tags=["facial-expression-recognition", "emotion-dist", "pytorch", "onnx"],
                              datasets=datasets, model_name="EmotionNet", eval_results=evals or None)
    classes = config["label_names"]
    lines = [f"# EmotionNet ({len(classes)} facial expressions)", "",
             f"A YOLO12-style CNN (ultralytics blocks) trained with emotion-dist {ed['version']} "
             "to classify a face crop "
             f"into: {', '.join(classes)}. Input: {config['in_channels']}-channel "
             f"{config['pretrained_cfg']['input_size'][1]} px images. Weights: the "
             f"{'exponential moving average (EMA)' if ed['weights'] == 'ema' else 'trained model'} "
             "of the checkpoint.", ""]
    lines += ["## Results on the test split", ""]
    if test:
        lines += [f"Accuracy **{test['accuracy']:.4f}**, macro-F1 **{test['macro_f1']:.4f}** on {test['count']} test "
                  f"images ({test.get('checkpoint', 'best.pt')}, "
                  f"test-time augmentation: {test.get('tta', 'none')}).", ""]
        per_class = test.get("per_class")
        if per_class:
            lines += ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
            lines += [f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                      for c, m in per_class.items()]
            lines.append("")
        else:
            lines += ["Per-class figures were not recorded by this run (trained before emotion-dist logged them); "
                      "`emotion-dist evaluate --checkpoint THIS_FOLDER` gives them.", ""]
        if has_confusion:
            lines += [f"![Confusion matrix on the test split]({CONFUSION_PNG})", ""]
    else:
        lines += ["This run recorded no test pass (train.eval_test=false, or no test split); "
                  "`emotion-dist evaluate --checkpoint THIS_FOLDER` measures it.", ""]
    val_how = (f"a stratified, seeded (train.seed={train.get('seed')}) {data.get('val_fraction')} "
               "share of the training "
               f"images" if data.get("val_fraction") is not None else "the data set's validation folder")
    lines += ["## How the data was split", "",
              f"Data: {dataset_name}" + (f" (`{data['kaggle_handle']}`)" if source == "kaggle" else "")
              + f", labels: {ed['checkpoint'].get('label_mode', 'majority')}. "
                "The test split is the data set's own test "
              f"folder; validation is {val_how} (the data set's own validation folder where it has one). best.pt was "
              f"chosen on validation macro-F1.",
              ("The test split was read once, at the end of training, on best.pt." if len(test_rows) == 1 else
               f"The run's metrics.jsonl holds {len(test_rows)} test passes "
               "(a resumed run repeats it); the last is shown."
               if test_rows else "The test split was not read during training."), ""]
    settings = {"epochs": train.get("epochs"), "steps": state.get("global_step"), "batch size (per process)":
                train.get("batch_size"), "processes": ed["checkpoint"].get("world_size"),
                "strategy": ed["checkpoint"].get("strategy"), "optimizer": "AdamW", "learning rate": train.get("lr"),
                "weight decay": train.get("weight_decay"), "label smoothing": train.get("label_smoothing"),
                "class weights": train.get("class_weights"), "EMA decay": train.get("ema_decay"),
                "precision": train.get("precision"), "seed": train.get("seed"),
                "image size": config["pretrained_cfg"]["input_size"][1],
                "stored image size": ed["checkpoint"].get("data_size")}
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in settings.items() if v is not None]
    lines += ["", "## Preprocessing", "", recipe_sentence(ed["preprocessing"]),
              "The full recipe is in config.json (`emotion_dist.preprocessing`).", ""]
    lines += ["## Intended use and limitations", "",
              "For research and prototyping on frontal face crops similar to the training data: "
              f"{dataset_name}. It is not an emotion detector: it reads posed or spontaneous facial "
              "*expressions*, which do not reliably tell what a person feels. Expect lower accuracy on "
              "profile faces, occlusions, low light, children and groups under-represented in the data; "
              "the per-class table shows which classes it confuses. Do not use it for decisions about "
              "people (hiring, policing, health, education).", ""]
    lines += ["## Example", "", "```python", "from emotion_dist.model import EmotionNet", "",
              'model = EmotionNet.from_pretrained("THIS_REPO_OR_FOLDER").eval()', "```", "",
              "```bash", "emotion-dist predict --checkpoint THIS_FOLDER photo.jpg", "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def hub_token() -> str:
    """The Hub token from HF_TOKEN or `huggingface-cli login`'s cache; one line when there is none.
    It is handed to HfApi and never printed or written."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                          "(huggingface-cli login); nothing was written")
    return token


def push_folder(folder: Path, repo_id: str, *, token: str, private: bool = False) -> str:
    """Upload the folder as the repo's new commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--push-to-hub {repo_id!r} is not OWNER/NAME; give e.g. your-name/emotionnet-fer2013")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=f"EmotionNet from emotion-dist {__version__}")
    return str(url)

