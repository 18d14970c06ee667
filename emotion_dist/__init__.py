"""emotion-dist: a distributed training harness for EmotionNet (facial expressions).

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
