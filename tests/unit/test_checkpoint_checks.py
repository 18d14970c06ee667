"""Checkpoints and ONNX sidecars that load but are wrong: each is refused by predict, evaluate,
export and `ckpt inspect` in one line naming the key, exit 2, nothing written; auto-resume skips an
unsound checkpoint; export's ONNX parity check (docs/reliability.md, "Checkpoints and exports")."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import built_once, write_checkpoint

from emotion_dist import cli
from emotion_dist.errors import CheckpointError
from emotion_dist.model import EmotionNet
from emotion_dist.modelio import checkpoint_findings, load_checkpoint

PHOTOS = Path(__import__("skimage.data", fromlist=["data"]).__file__).parent
ASTRONAUT, COFFEE = str(PHOTOS / "astronaut.png"), str(PHOTOS / "coffee.png")


def gray_weights() -> dict:
    torch.manual_seed(0)
    return EmotionNet(1, 7).state_dict()


def nan_weights() -> dict:
    return {k: v * math.nan if v.is_floating_point() else v for k, v in gray_weights().items()}


# case: (write_checkpoint's arguments, what the one line must say). Each damages one thing, as a
# user would with torch.load(weights_only=True), an edit and torch.save.
CASES = {
    "model_state_dict as a list": (lambda: {"model_state_dict": [torch.zeros(3)]},
                                   "model_state_dict is a list"),
    "model_state_dict=5": (lambda: {"model_state_dict": 5}, "model_state_dict is an int (5), not a dict of tensors"),
    'normalization {"mean": "x"}': (lambda: {"normalization": {"mean": "x"}}, "normalization={'mean': 'x'} is not"),
    "std [0.0]": (lambda: {"normalization": {"mean": [0.449], "std": [0.0]}},
                  "normalization.std=[0.0] holds a value <= 0"),
    "image_size 100000": (lambda: {"image_size": 100000, "data_size": 48},
                          "image_size=100000 is not a model input size"),
    "image_size 0": (lambda: {"image_size": 0, "data_size": 48}, "image_size=0 is not a model input size"),
    'image_size "64"': (lambda: {"image_size": "64", "data_size": 48}, "image_size='64' is a str, not a whole number"),
    "8 class names on a 7-way head": (lambda: {"class_names": [*"abcdefgh"]},
                                      "class_names lists 8 classes but model_state_dict has a 7-way head "
                                      "(classify.linear.weight (7, 1280))"),
    "in_channels 3 on 1-channel weights": (lambda: {"in_channels": 3, "model_state_dict": gray_weights()},
                                           "in_channels=3 but model_state_dict's first convolution takes 1 "
                                           "channel(s) (backbone.0.conv.weight (16, 1, 3, 3)); set in_channels=1"),
    "one wrong tensor shape": (lambda: {"model_state_dict": {**gray_weights(),
                                                             "backbone.3.conv.weight": torch.zeros(2, 2)}},
                               "backbone.3.conv.weight is (2, 2) where the model has (128, 64, 3, 3)"),
    "one missing key": (lambda: {"model_state_dict": {k: v for k, v in gray_weights().items()
                                                      if k != "classify.linear.bias"}},
                        "model_state_dict does not fit EmotionNet(in_channels=1, 7 classes): "
                        "missing classify.linear.bias"),
    "NaN weights": (lambda: {"model_state_dict": nan_weights()}, "non-finite weights: NaN in backbone.0.conv.weight"),
    "config 5": (lambda: {"config": 5}, "config is an int (5), not the training run's settings"),
    "inf weights": (lambda: {"model_state_dict": {**gray_weights(),
                                                  "classify.linear.bias": torch.full((7,), math.inf)}},
                    "non-finite weights: inf in classify.linear.bias"),
}


@pytest.fixture(scope="session")
def damaged(tmp_path_factory) -> dict[str, Path]:
    """Each case's checkpoint file, and a safetensors file named .pt (written once for all workers)."""
    from safetensors.torch import save_file

    def build(folder: Path) -> None:
        for i, (fields, _) in enumerate(CASES.values()):
            write_checkpoint(folder / f"{i}.pt", **fields())
        save_file(gray_weights(), str(folder / "weights.pt"))

    folder = built_once(tmp_path_factory, "damaged_checkpoints", build)
    return {**{name: folder / f"{i}.pt" for i, name in enumerate(CASES)},
            "a safetensors file as .pt": folder / "weights.pt"}


EXPECTED = {**{name: text for name, (_, text) in CASES.items()},
            "a safetensors file as .pt": "is a safetensors file: weights only"}


def commands(path: Path, out: Path) -> dict[str, list[str]]:
    """Each command that loads a checkpoint, with outputs under `out` (none may appear)."""
    return {
        "predict": ["predict", "--checkpoint", str(path), "--no-detect", ASTRONAUT, COFFEE,
                    "--json-out", str(out / "faces.json")],
        "evaluate": ["evaluate", "--checkpoint", str(path), "--json-out", str(out / "eval.json"), "--out",
                     str(out / "eval"), f"run.cache_dir={out / 'cache'}"],
        "export": ["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out / "m.onnx")],
        "ckpt inspect": ["ckpt", "inspect", str(path)],
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "ckpt inspect"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_damaged_checkpoint_is_one_line_exit_2_and_nothing_written(damaged, case, command, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    argv = commands(damaged[case], out)[command]
    assert cli.main(argv) == 2
    stdout, stderr = capfd.readouterr()
    assert stdout == "" and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert EXPECTED[case] in stderr and "Traceback" not in stderr, stderr
    assert list(out.iterdir()) == []  # no report, no export, no cache


def test_every_problem_is_listed_by_inspect_and_the_first_by_the_others(tmp_path, capfd):
    bad = write_checkpoint(tmp_path / "bad.pt", image_size="64", data_size=48,
                           normalization={"mean": [0.449], "std": [0.0]}, model_state_dict=nan_weights())
    assert cli.main(["ckpt", "inspect", str(bad)]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"error: checkpoint {bad}: ") for line in lines)
    assert ["image_size='64'" in lines[0], "normalization.std" in lines[1], "NaN in" in lines[2]] == [True] * 3
    assert cli.main(["ckpt", "inspect", str(bad), "--json"]) == 2
    doc = json.loads(capfd.readouterr().out)
    assert doc["emotion_dist"] == "ckpt inspect" and len(doc["problems"]) == 3
    assert cli.main(["predict", "--checkpoint", str(bad), "--no-detect", ASTRONAUT]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "image_size='64'" in err and f"(2 more: emotion-dist ckpt inspect {bad})" in err


def test_inspect_passes_a_sound_checkpoint_and_says_what_it_checked(unit_checkpoint, capfd):
    assert cli.main(["ckpt", "inspect", str(unit_checkpoint)]) == 0
    out = capfd.readouterr().out
    assert "checked         metadata, 350 tensors fit EmotionNet(in_channels=1, 7 classes), all finite" in out


def test_an_ema_with_nan_is_refused_though_the_model_weights_are_finite(tmp_path):
    path = write_checkpoint(tmp_path / "ema.pt", ema_state_dict=nan_weights(), ema_updates=3)
    findings = checkpoint_findings(load_checkpoint(path), path)
    assert len(findings) == 1 and "ema_state_dict holds non-finite weights: NaN in" in findings[0]


# ------------------------------------------------------------------------------- resume
def test_auto_resume_falls_back_past_a_nan_checkpoint(tmp_path, caplog):
    from emotion_dist.training.checkpoint import CheckpointFiles, plan_start

    sound = load_checkpoint(write_checkpoint(tmp_path / "model.pt"))
    files = CheckpointFiles(tmp_path / "run", keep=3)
    files.save({**sound, "global_step": 4}, 4)
    files.save({**sound, "model_state_dict": nan_weights(), "global_step": 8}, 8)  # last.pt and step 8: NaN
    plan = plan_start(CheckpointFiles(tmp_path / "run", keep=3), "auto")
    assert plan.path.name == "step-00000004.pt" and plan.state["global_step"] == 4
    assert caplog.text.count("skipping checkpoint") == 2 and "NaN in backbone.0.conv.weight" in caplog.text


def test_resume_from_a_named_nan_checkpoint_is_refused_in_one_line(tmp_path):
    from emotion_dist.training.checkpoint import CheckpointFiles, plan_start

    path = write_checkpoint(tmp_path / "nan.pt", model_state_dict=nan_weights(), optimizer_state_dict={},
                            sampler={})
    with pytest.raises(CheckpointError, match="non-finite weights: NaN in backbone.0.conv.weight"):
        plan_start(CheckpointFiles(tmp_path / "run"), str(path))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- ONNX sidecars
@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory) -> Path:
    """A 64 px model exported through the command line (the parity check included), once for all
    workers."""
    def build(folder: Path) -> None:
        ckpt = write_checkpoint(folder / "m64.pt", image_size=64, data_size=48)
        assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out",
                         str(folder / "m64.onnx")]) == 0

    return built_once(tmp_path_factory, "onnx_export_64", build) / "m64.onnx"


SIDECAR_CASES = {  # what is changed in the sidecar: what the one line must say
    "image_size 96 for a 64 px model": ({"image_size": 96}, "m.json says image_size=96 but"),
    "in_channels 3 on a 1-channel graph": ({"in_channels": 3, "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3}},
                                           "m.json says in_channels=3 but"),
    "8 classes on a 7-way graph": ({"classes": [*"abcdefgh"]}, "outputs ['batch', 7] but its sidecar lists 8 classes"),
    'normalization {"mean": "x"}': ({"normalization": {"mean": "x"}}, "normalization={'mean': 'x'} is not"),
    "std [0.0]": ({"normalization": {"mean": [0.449], "std": [0.0]}}, "normalization.std=[0.0] holds a value <= 0"),
    'image_size "64"': ({"image_size": "64"}, "image_size='64' is a str"),
    "image_size 100000": ({"image_size": 100000}, "image_size=100000 is not a model input size"),
    "classes 5": ({"classes": 5}, "classes=5 is not a list of class names"),
}


@pytest.mark.parametrize("case", list(SIDECAR_CASES))
def test_a_wrong_sidecar_is_refused_once_at_load(onnx_export, case, tmp_path, capfd):
    change, expected = SIDECAR_CASES[case]
    shutil.copy(onnx_export, tmp_path / "m.onnx")
    meta = json.loads(onnx_export.with_suffix(".json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, **change}))
    argv = ["predict", "--checkpoint", str(tmp_path / "m.onnx"), "--no-detect", ASTRONAUT, COFFEE,
            "--json-out", str(tmp_path / "faces.json")]
    assert cli.main(argv) == 2
    stdout, stderr = capfd.readouterr()
    assert stdout == "" and stderr.count("\n") == 1 and expected in stderr, stderr  # once, not per image
    assert "re-run emotion-dist export" in stderr and not (tmp_path / "faces.json").exists()


def test_the_export_reports_its_parity_figures(onnx_export, unit_checkpoint, tmp_path, capfd):
    meta = json.loads(onnx_export.with_suffix(".json").read_text())
    parity = meta["onnx_parity"]
    assert parity["images"] == 6 and parity["classes_agree"] + parity["near_ties"] == 6
    assert parity["max_abs_diff"] <= parity["tolerance"] == 1e-3 * max(1.0, parity["max_abs_logit"])
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(unit_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1] == f"exported {out} (+ m.json)"
    assert (lines[0].startswith("ONNX parity on 6 in-range images: max |diff| ")
            and "predicted class agrees on" in lines[0])


def test_the_sidecar_checks_import_no_torch():
    """The ONNX-only path (predict with an .onnx) checks sidecars through modelmeta, which must not
    import torch (the layering test keeps its emotion_dist imports to config and below)."""
    source = (Path(cli.__file__).parent / "modelmeta.py").read_text()
    imported = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert not any(m.split(".")[0] in ("torch", "numpy") for m in imported if m)


# ------------------------------------------------------------------------------- export parity
def _model(seed: int, gain: float = 1.25) -> EmotionNet:
    """EmotionNet whose activations neither vanish nor explode (PyTorch's default init makes them
    vanish through the 20-odd layers, so every output is the head's bias): weights N(0, gain^2/fan_in).
    gain 1.25 gives logits of tens to hundreds, as a trained model's, where a float32 graph can differ
    from PyTorch by more than an absolute bound of 1e-4 allows."""
    from torch import nn

    torch.manual_seed(seed)
    model = EmotionNet(1, 7).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, gain / math.sqrt(m.weight[0].numel()))
    return model


META = {"in_channels": 1, "image_size": 32, "data_size": 32, "normalization": {"mean": [0.449], "std": [0.226]},
        "classes": ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]}


@pytest.fixture(scope="session")
def graph(tmp_path_factory) -> bytes:
    """_model(2) as ONNX, exported once (for all workers) for the parity tests."""
    from emotion_dist.commands.export import onnx_bytes
    from emotion_dist.inference.predict import preprocessing_recipe

    def build(folder: Path) -> None:
        meta = {**META, "preprocessing": preprocessing_recipe(META)}
        (folder / "model2.onnx").write_bytes(onnx_bytes(_model(2), meta))

    return (built_once(tmp_path_factory, "parity_graph", build) / "model2.onnx").read_bytes()


def test_parity_scales_its_tolerance_with_the_logits(graph):
    from emotion_dist.commands.export import onnx_parity

    parity = onnx_parity(_model(2), graph, META)
    assert parity.ok and parity.max_abs_logit > 5 and parity.tolerance == pytest.approx(1e-3 * parity.max_abs_logit)
    assert parity.max_abs_diff < parity.tolerance / 10 and parity.agree == parity.images == 6


def test_parity_refuses_a_graph_that_is_not_the_model(graph):
    from emotion_dist.commands.export import onnx_parity

    parity = onnx_parity(_model(3), graph, META)
    assert not parity.ok and parity.max_abs_diff > parity.tolerance
    assert "differ from PyTorch's" in parity.failure() and "\n" not in parity.failure()


def test_parity_fails_on_non_finite_outputs(graph):
    """NaN against NaN used to pass the comparison."""
    from emotion_dist.commands.export import onnx_parity

    model = _model(2)
    with torch.no_grad():
        model.classify.linear.bias.fill_(math.nan)
    parity = onnx_parity(model, graph, META)
    assert not parity.ok and not parity.finite and "not finite" in parity.failure()
