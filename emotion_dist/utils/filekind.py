"""What a model path holds, told from its first bytes: a PyTorch checkpoint, an ONNX model, a
safetensors file (weights only), or something else (an image, a text file, nothing). A leaf module
(imports only `errors`, never torch).

Without this a JPEG or a text file given as `--checkpoint` reached torch.load and was called
"pickled objects ... refused", and a .pt named .onnx reached onnxruntime's InvalidProtobuf.
"""

from __future__ import annotations

import os
from pathlib import Path

from emotion_dist.errors import CheckpointError

TORCH, ONNX, SAFETENSORS = "a PyTorch checkpoint", "an ONNX model", "a safetensors file"
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
HF_FOLDER = "a Hugging Face model folder"  # export --format hf: config.json + model.safetensors, loaded by torch
HF_FILES = ("config.json", "model.safetensors")
_MAGIC = [
    (b"PK\x03\x04", TORCH),  # torch.save's zip format
    (b"\x80\x02\x8a\x0a", TORCH),  # torch.save's legacy format: pickle protocol 2, then its magic number
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"RIFF", "a RIFF file (WebP image, AVI video, WAV audio)"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\xfd7zXZ", "an xz file"),
    (b"%PDF", "a PDF document"),
]
# ONNX ModelProto: field 1 (ir_version, a small varint), then another top-level field
# (producer_name, producer_version, domain, model_version, doc_string, graph, opset_import)
_ONNX_SECOND_FIELD = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42}
HINT = ("--checkpoint takes a .pt checkpoint (runs/NAME/checkpoints/best.pt), a model from "
        "emotion-dist export --format onnx, or a folder from emotion-dist export --format hf")


def kind(path: str | os.PathLike) -> str:
    """TORCH, ONNX, or a few words saying what else the file is ("a JPEG image", "a text file",
    "an empty file", "an unknown file"). Raises CheckpointError for a missing path or a folder."""
    path = Path(path)
    if path.is_dir():
        if all((path / name).is_file() for name in HF_FILES):
            return HF_FOLDER
        raise CheckpointError(f"{path} is a folder; {HINT}")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the path") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if not head:
        return "an empty file"
    if _is_safetensors(head, path):  # first: its first 8 bytes are a length, and may look like a magic number
        return SAFETENSORS
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELD:
        return ONNX
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            pass
    return "an unknown file"


def _is_safetensors(head: bytes, path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON (`{...}`)."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    try:
        return 2 <= size <= MAX_SAFETENSORS_HEADER and 8 + size <= path.stat().st_size
    except OSError:
        return False


def require(path: str | os.PathLike, accept: tuple[str, ...] = (TORCH, ONNX)) -> str:
    """The kind of a model file, or one line naming what it is instead and what to give. An
    unknown file passes when TORCH is accepted (torch.load then says whether it is truncated)."""
    what = kind(path)
    if what in accept or (what == HF_FOLDER and TORCH in accept):  # a folder goes where a .pt goes
        return what
    if what == "an unknown file" and TORCH in accept:
        return TORCH
    if what == ONNX:
        raise CheckpointError(f"{path} is an ONNX model; this command needs the .pt checkpoint it was exported from")
    if what == SAFETENSORS:
        raise CheckpointError(
            f"{path} is a safetensors file: weights only (emotion-dist export --format safetensors writes one), "
            f"without the classes, image size and normalisation a model is run with; give the .pt checkpoint "
            f"it was exported from (runs/NAME/checkpoints/best.pt){' or its ONNX export' if ONNX in accept else ''}")
    if what == TORCH:
        raise CheckpointError(f"{path} is a PyTorch checkpoint, not an ONNX model; give it as is or export it "
                              f"with emotion-dist export --format onnx")
    raise CheckpointError(f"{path} is {what}, not a model; {HINT}")
