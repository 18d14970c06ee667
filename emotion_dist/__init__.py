"""emotion-dist: a distributed training harness for EmotionNet (facial expressions)."""

__version__ = "0.1.0"
