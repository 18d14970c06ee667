"""`python -m emotion_dist ...` is `emotion-dist ...`."""

import sys

from emotion_dist.cli import main

sys.exit(main())
