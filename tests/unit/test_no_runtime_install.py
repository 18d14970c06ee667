"""No dependency changes the environment at run time: reading an unreadable or HEIC-named image
through emotion-dist's own paths, after ultralytics is imported (EmotionNet's blocks), touches
neither pip nor the network."""

import importlib
import socket
import subprocess

import pytest

import emotion_dist
from emotion_dist.data.images import read_uint8
from emotion_dist.inference.predict import UNREADABLE, read_image
from emotion_dist.model import EmotionNet


@pytest.fixture
def no_network_no_processes(monkeypatch):
    """Every attempt to start a process (pip, uv) or reach the network (DNS, connect) is recorded
    and fails."""
    tried = []

    def refuse(what):
        def call(*args, **kwargs):
            tried.append((what, args[1:2] if what == "process" else args[:2]))
            raise OSError(f"test: no {what}")
        return call

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("process"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("DNS"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("connect"))
    return tried


@pytest.mark.parametrize("name, data", [("photo.heic", b"ftypheic not really"), ("notes.jpg", b"hello"),
                                        ("empty.png", b"")])
def test_an_unreadable_image_is_refused_without_pip_or_network(tmp_path, no_network_no_processes, capfd, name, data):
    EmotionNet(1, 7)  # imports ultralytics, as training and predict do
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises(Exception) as e:
        read_uint8(bad)
    assert type(e.value).__name__ == "UnidentifiedImageError"  # PIL's own answer, not ultralytics' ImportError
    with pytest.raises(ValueError) as e:
        read_image(bad)
    assert str(e.value) == UNREADABLE
    assert no_network_no_processes == []
    out = capfd.readouterr()
    assert "AutoUpdate" not in out.out + out.err and "requirement" not in out.out + out.err


def test_ultralytics_is_imported_offline_without_auto_install_and_without_its_patches():
    import PIL.Image
    import torch
    import ultralytics.utils
    import ultralytics.utils.checks
    from ultralytics.utils import patches

    EmotionNet(1, 7)
    assert ultralytics.utils.ONLINE is False and ultralytics.utils.checks.AUTOINSTALL is False
    assert PIL.Image.open is not patches.image_open and torch.save is not patches.torch_save


def test_importing_emotion_dist_turns_ultralytics_network_and_install_off(monkeypatch):
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.delenv("YOLO_AUTOINSTALL", raising=False)
    importlib.reload(emotion_dist)
    import os

    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"
    monkeypatch.setenv("YOLO_AUTOINSTALL", "True")  # a user's own choice is kept
    importlib.reload(emotion_dist)
    assert os.environ["YOLO_AUTOINSTALL"] == "True"
