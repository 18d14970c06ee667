"""emotion-dist: a distributed training harness for EmotionNet (facial expressions).

The Python API (emotion_dist/api.py), imported on first use so that `import emotion_dist` and
`emotion-dist --help` load nothing heavy:

    import emotion_dist as ed
    model = ed.load("runs/default/checkpoints/best.pt")   # .pt, .onnx or an export's folder
    model.predict("photo.jpg")                              # faces: label, probability, box
    ed.train("configs/default.yaml", train={"epochs": 2})  # the run's final figures
    ed.EmotionNet                                           # the model class

A dependency may never change the environment at run time. ultralytics (whose blocks EmotionNet is
built from) would, on import, look up two DNS names to decide whether it is online, and later
pip-install what it misses (pi-heif, the first time PIL cannot identify a file): its own switches
turn both off for the whole process and its children, before anything imports it. A user who
sets them keeps theirs. model.undo_ultralytics_patches undoes what it changes in other libraries.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics.utils.ONLINE = False: no DNS look-ups, no downloads
os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # ultralytics.utils.checks.check_requirements never runs pip

__version__ = "0.1.0"

_API = ("load", "train", "Model", "Predictions", "EmotionNet")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:  # PEP 562: the API module loads on first use (it imports cli, which reads __version__)
        import importlib

        return getattr(importlib.import_module("emotion_dist.api"), name)
    raise AttributeError(f"module 'emotion_dist' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
