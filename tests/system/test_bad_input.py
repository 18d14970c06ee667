"""Bad input -> one line naming the fix, and the right exit code, as a table run in
this process through the real command line (cli.main): config, launch environment, files, checkpoints
and outputs. Each case checks before expensive work where it can, and writes nothing it should not.
docs/reliability.md lists every row of the table (a test below checks it does)."""

import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from emotion_dist import cli
from emotion_dist.distributed import interrupts

REL = (ROOT / "docs/reliability.md").read_text()


def _weights_only(tmp_path, tiny_model):
    path = tmp_path / "weights.pt"
    torch.save({"model_state_dict": torch.load(tiny_model.pt, weights_only=True)["model_state_dict"]}, path)
    return path


def _version_string(tmp_path, tiny_model):
    state = torch.load(tiny_model.pt, weights_only=True)
    state["format_version"] = "2"
    torch.save(state, tmp_path / "v2.pt")
    return tmp_path / "v2.pt"


def _file(name, data: bytes):
    def make(tmp_path, tiny_model):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _read_only_folder(tmp_path, tiny_model):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    return mnt


def _free_port(tmp_path, tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _busy_port(tmp_path, tiny_model):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _busy_port.socket = s  # kept open for the case
    return s.getsockname()[1]


TRAIN = ["train", "train.max_steps=1", "data.synthetic_train=14", "data.synthetic_test=7"]
# (case, argv with {x} for the setup's result, environment, setup(tmp_path, tiny_model), exit code, words of the line)
CASES = [
    ("config file with a Latin-1 byte", ["train", "--config", "{x}"], {},
     _file("latin1.yaml", b"train:\n  epochs: 3  # caf\xe9\n"), 2, "is not UTF-8 text"),
    ("dist.timeout_s=inf", [*TRAIN, "dist.timeout_s=inf"], {}, None, 2, "expected a finite number"),
    ("dist.timeout_s=1e15", [*TRAIN, "dist.timeout_s=1e15"], {}, None, 2, "at most 604800"),
    ("train.seed=-1", [*TRAIN, "train.seed=-1"], {}, None, 2, "train.seed=-1 must be between 0 and 2**63-1"),
    ("data.image_size=1000000000", [*TRAIN, "data.image_size=1000000000"], {}, None, 2, "too large"),
    ("dist.backend=nccl on CPU", [*TRAIN, "dist.backend=nccl"], {}, None, 2, "needs CUDA GPUs"),
    ("train.lr=inf", [*TRAIN, "train.lr=inf"], {}, None, 2, "expected a finite number"),
    ("MASTER_PORT=99999", TRAIN, {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, None, 2,
     "MASTER_PORT=99999 is not a TCP port"),
    ("MASTER_PORT in use", [*TRAIN, "dist.timeout_s=5"], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "{x}"},
     _busy_port, 2, "is already in use on this host"),
    ("RANK=0 WORLD_SIZE=2 with no peer", [*TRAIN, "dist.timeout_s=2"],
     {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "{x}"}, _free_port, 2, "start every process"),
    ("run.dir is a file", [*TRAIN, "run.dir={x}"], {}, _file("run-dir-file", b"x"), 2, "is a file, not a folder"),
    ("run.cache_dir is a file", [*TRAIN, "run.cache_dir={x}"], {}, _file("cache-file", b"x"), 2, "is a file"),
    ("run.dir on a read-only filesystem", [*TRAIN, "run.dir={x}/run"], {}, _read_only_folder, 2, "cannot write"),
    ("run.cache_dir on a read-only filesystem", [*TRAIN, "run.cache_dir={x}/c"], {}, _read_only_folder, 2,
     "run.cache_dir"),
    ("weights-only .pt to evaluate", ["evaluate", "--checkpoint", "{x}"], {}, _weights_only, 2,
     "holds weights but not the metadata"),
    ("weights-only .pt to export", ["export", "--checkpoint", "{x}", "--format", "onnx"], {}, _weights_only, 2,
     "holds weights but not the metadata"),
    ("weights-only .pt to predict", ["predict", "--checkpoint", "{x}", "--no-detect", str(ROOT / "docs/images")], {},
     _weights_only, 2, "holds weights but not the metadata"),
    ("weights-only .pt to ckpt inspect", ["ckpt", "inspect", "{x}"], {}, _weights_only, 2,
     "holds weights but not the metadata"),
    ("weights-only .pt to resume", [*TRAIN, "run.resume={x}"], {}, _weights_only, 2,
     "holds weights but not the metadata"),
    ('format_version="2"', ["evaluate", "--checkpoint", "{x}"], {}, _version_string, 2, "invalid format_version '2'"),
    ("evaluate model.in_channels=3 on a gray model", ["evaluate", "--checkpoint", "{x}", "model.in_channels=3"], {},
     lambda t, m: m.pt, 2, "takes in_channels=1 images"),
    ("a text file as checkpoint", ["evaluate", "--checkpoint", "{x}"], {}, _file("notes.pt", b"hello\n"), 2,
     "is a text file"),
    ("a JPEG as checkpoint", ["evaluate", "--checkpoint", "{x}"], {}, _file("photo.pt", b"\xff\xd8\xff\xe0JFIF"), 2,
     "is a JPEG image"),
    ("an .onnx to evaluate", ["evaluate", "--checkpoint", "{x}"], {}, lambda t, m: m.onnx, 2, "is an ONNX model"),
    ("a truncated .onnx to predict", ["predict", "--checkpoint", "{x}", str(ROOT / "docs/images")], {},
     lambda t, m: _truncated_onnx(t, m), 2, "onnx"),
    ("evaluate --json-out into a missing folder", ["evaluate", "--checkpoint", "{x}", "--json-out", "/missing/r.json"],
     {}, lambda t, m: m.pt, 2, "the folder /missing does not exist"),
    ("evaluate --out FILE", ["evaluate", "--checkpoint", "{x}", "--out", str(ROOT / "README.md")], {},
     lambda t, m: m.pt, 2, "is a file"),
    ("predict --out FILE", ["predict", "--checkpoint", "{x}", str(ROOT / "docs/images"), "--out",
                            str(ROOT / "README.md")], {}, lambda t, m: m.pt, 2, "is a file"),
    ("export --out with another suffix", ["export", "--checkpoint", "{x}", "--format", "onnx", "--out", "m.json"], {},
     lambda t, m: m.pt, 2, "does not end in .onnx"),
]


def _truncated_onnx(tmp_path, tiny_model):
    data = Path(tiny_model.onnx).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "cut.json").write_bytes(Path(tiny_model.onnx).with_suffix(".json").read_bytes())
    return tmp_path / "cut.onnx"


@pytest.fixture
def clean_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    interrupts.uninstall()  # train installs stop handlers; give pytest its own back


@pytest.mark.parametrize("case,argv,env,setup,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_an_exit_code(case, argv, env, setup, code, words, tmp_path, tiny_model,
                                                clean_process, capsys):
    x = setup(tmp_path, tiny_model) if setup else None
    argv = [a.replace("{x}", str(x)) for a in argv]
    if argv[0] == "train":
        argv += [f"run.dir={tmp_path / 'run'}" if not any(a.startswith("run.dir=") for a in argv) else "",
                 f"run.cache_dir={tmp_path / 'cache'}" if not any(a.startswith("run.cache_dir=") for a in argv) else ""]
        argv = [a for a in argv if a]
    for k, v in env.items():
        clean_process.setenv(k, v.replace("{x}", str(x)))
    try:
        rc = cli.main(argv)
    finally:
        if case == "run.dir on a read-only filesystem" or case == "run.cache_dir on a read-only filesystem":
            subprocess.run(["umount", str(x)])
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == code, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert words.lower() in lines[0].lower(), lines[0]
    assert f"| {case} |" in REL, f"docs/reliability.md has no row for {case!r}"
