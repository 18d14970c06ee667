"""What makes an ONNX export stand alone: the preprocessing recipe and class names in its
metadata_props, and a graph that OpenCV DNN (a consumer no one here wrote) runs at any batch.

ultralytics' area attention (AAttn) reshapes with sizes read from the input (`B, _, H, W = x.shape`),
which the tracer exports as Shape -> Gather -> Mul -> Concat chains into Reshape. onnxruntime
evaluates them per call; OpenCV DNN 4.x resolves them once, at the batch of the graph's example
input, and asserts at any other batch. `opencv_compatible` swaps, for the export only, a forward with
the same arithmetic whose reshapes take the spatial sizes as constants and the batch as -1.
"""

from __future__ import annotations

import contextlib
import json
import types

import torch

from emotion_dist import __version__

META_PREFIX = "emotion_dist."


def _aattn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """AAttn.forward (ultralytics 8.3-8.4) with constant spatial sizes and a free (-1) batch."""
    _, _, h, w = (int(d) for d in x.shape)  # constants in the traced graph; the batch is never read
    n, c, area = h * w, self.all_head_dim, self.area
    qkv = self.qkv(x).reshape(-1, c * 3, n).transpose(1, 2)
    if area > 1:
        qkv = qkv.reshape(-1, n // area, c * 3)
        n //= area
    q, k, v = (qkv.reshape(-1, n, self.num_heads, self.head_dim * 3).permute(0, 2, 3, 1)
               .split([self.head_dim, self.head_dim, self.head_dim], dim=2))
    attn = ((q * (self.head_dim ** -0.5)).transpose(-2, -1) @ k).softmax(dim=-1)
    x = (v @ attn.transpose(-2, -1)).permute(0, 3, 1, 2)
    v = v.permute(0, 3, 1, 2)
    x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # (B*area, n, heads, hd) -> (B, H, W, C), as AAttn's two steps
    v = v.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    return self.proj(x + self.pe(v))


@contextlib.contextmanager
def opencv_compatible(model: torch.nn.Module):
    """For the duration of an export: every AAttn runs `_aattn_forward` (the parity check after the
    export compares the graph with the model's own forward)."""
    from ultralytics.nn.modules.block import AAttn

    patched = [m for m in model.modules() if isinstance(m, AAttn)]
    for m in patched:
        m.forward = types.MethodType(_aattn_forward, m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def add_metadata(onnx_bytes: bytes, meta: dict, recipe: dict) -> bytes:
    """The model with metadata_props: classes, the preprocessing recipe and the sizes, each a JSON
    value under an `emotion_dist.` key (onnx's metadata is string to string)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    props = {"classes": meta["classes"], "preprocessing": recipe, "image_size": meta["image_size"],
             "data_size": meta["data_size"], "in_channels": meta["in_channels"],
             "normalization": meta["normalization"], "version": __version__}
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    model.producer_name, model.doc_string = ("emotion-dist",
                                             "EmotionNet facial-expression classifier: logits N x classes")
    return model.SerializeToString()


def read_metadata(onnx_model) -> dict:
    """metadata_props written by add_metadata, decoded (a path, bytes or an onnx ModelProto)."""
    import onnx

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load_from_string(onnx_model) if isinstance(onnx_model, bytes) else onnx.load(str(onnx_model))
    return {p.key[len(META_PREFIX):]: json.loads(p.value) for p in onnx_model.metadata_props
            if p.key.startswith(META_PREFIX)}
