"""`emotion-dist predict`: still images (inference.predict.run_images), or a video file, stream or
camera (inference.video.run_video). The pipelines live in inference/; this picks one for the inputs."""

from __future__ import annotations

from emotion_dist.errors import ConfigError
from emotion_dist.inference.video import run_video, source_of
from emotion_dist.utils import filekind


def run_predict(args) -> int:
    """`emotion-dist predict`: still images (predict.run_images), or a video file, stream or camera."""
    from emotion_dist.inference.predict import run_images

    filekind.require(args.checkpoint)  # a missing model, a folder or a JPEG: one line before anything else
    source = source_of(args)
    if source is not None and getattr(args, "cam", False):
        raise ConfigError("--cam writes Grad-CAM overlays for still images; drop it for a video or camera")
    return run_images(args) if source is None else run_video(args, source)
