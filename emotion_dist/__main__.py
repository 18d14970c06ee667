"""`python -m emotion_dist ...` is `emotion-dist ...`."""

import sys

from .cli import main

sys.exit(main())
