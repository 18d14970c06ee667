"""export --format onnx --int8: static QDQ int8 calibrated on training images, checked against fp32
on the test split, written with its check in the sidecar; predict reads it like the fp32 file.
The model is lively_checkpoint's (answers that differ per picture, so int8 can change some)."""

import json

import pytest
from lively import lively_checkpoint

from emotion_dist import cli


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_data):
    from emotion_dist.config import Config

    d = tmp_path_factory.mktemp("int8")
    cfg = Config()
    cfg.data.source, cfg.data.root, cfg.data.image_size = "folder", str(tiny_data), 32
    cfg.run.cache_dir = str(d / "cache")
    ckpt = lively_checkpoint(d / "best.pt", image_size=32, spread=0.01, config=cfg.to_dict())
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(d / "fp32.onnx")]) == 0
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--int8", "--calibration", "24",
                     "--min-agreement", "0.5"]) == 0
    return d


def test_int8_below_min_agreement_is_refused_in_one_line_and_writes_nothing(int8_export, tmp_path, capsys):
    check = json.loads((int8_export / "best.int8.json").read_text())["int8"]
    assert check["agreement"] < 1.0  # this untrained model's answers move under int8
    capsys.readouterr()
    out = tmp_path / "q.onnx"
    args = ["export", "--checkpoint", str(int8_export / "best.pt"), "--format", "onnx", "--int8", "--calibration",
            "24", "--min-agreement", "1.0", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below --min-agreement 1.0" in err[0] and "nothing written" in err[0]
    assert list(tmp_path.iterdir()) == []
    assert cli.main([*args, "--force"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["int8"]["agreement"] == check["agreement"]


def test_int8_is_smaller_and_its_sidecar_reports_the_check(int8_export):
    d = int8_export
    assert (d / "best.int8.onnx").stat().st_size < (d / "fp32.onnx").stat().st_size / 2.5
    meta = json.loads((d / "best.int8.json").read_text())
    check = meta["int8"]
    assert meta["precision"] == "int8" and check["calibration_images"] == 24 and check["test_images"] == 63
    for key in ("agreement", "fp32_accuracy", "int8_accuracy"):
        assert 0 <= check[key] <= 1
    assert check["speed_ratio"] > 0 and "QDQ, per-channel" in check["method"]
    assert meta["preprocessing"]["crop_margin"] == 0.15


def test_int8_graph_is_quantized_and_carries_the_metadata(int8_export):
    import onnx

    from emotion_dist.inference.standalone import read_metadata

    model = onnx.load(str(int8_export / "best.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert read_metadata(model)["classes"][3] == "happy"


def test_predict_reads_the_int8_file_as_it_reads_the_fp32_one(int8_export, tiny_data, tmp_path):
    docs = {}
    for name in ("fp32.onnx", "best.int8.onnx"):
        out = tmp_path / f"{name}.json"
        assert cli.main(["predict", "--checkpoint", str(int8_export / name), "--no-detect",
                         str(tiny_data / "test"), "--json-out", str(out)]) == 0
        docs[name] = json.loads(out.read_text())["faces"]
    assert len(docs["fp32.onnx"]) == len(docs["best.int8.onnx"]) == 63
    assert [f["file"] for f in docs["fp32.onnx"]] == [f["file"] for f in docs["best.int8.onnx"]]


def test_int8_outside_onnx_is_refused_in_one_line(unit_checkpoint, capsys):
    assert cli.main(["export", "--checkpoint", str(unit_checkpoint), "--format", "safetensors", "--int8"]) == 2
    assert "--format onnx" in capsys.readouterr().err
