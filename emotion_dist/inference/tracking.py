"""Faces across video frames: a greedy IoU tracker that gives each face a stable id, and the
per-track moving average of class probabilities that `predict --smooth N` reports.

Pure (numpy only, no OpenCV, no model) so it is unit-tested without a video. One detector box per
face per frame is matched to the live track it overlaps most (highest IoU first, at least
`iou_threshold`); a face the detector misses for up to `max_missed` processed frames keeps its id
when it comes back near where it was. A moving average over the last N frames (not an EMA) keeps
the reported numbers easy to check: the mean of the last N raw probability vectors of that track.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two x, y, w, h boxes (0 when they do not touch)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


@dataclass
class Track:
    id: int
    box: Box
    history: deque = field(repr=False)  # the last `smooth` raw probability vectors
    missed: int = 0  # processed frames since the detector last saw this face

    def smoothed(self) -> np.ndarray:
        return np.mean(np.stack(self.history), axis=0)


class IoUTracker:
    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 10, smooth: int = 5):
        if smooth < 1:
            raise ValueError("smooth must be >= 1 (1 = no smoothing)")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.smooth = smooth
        self.tracks: list[Track] = []
        self._next_id = 1

    @property
    def tracks_seen(self) -> int:
        """How many distinct faces (ids) so far."""
        return self._next_id - 1

    def update(self, boxes: Sequence[Sequence[int]], probabilities: Sequence[np.ndarray]) -> list[Track]:
        """One processed frame: its detections and their raw probabilities. Returns the track of
        each detection, in the order given; `Track.smoothed()` is the value to report."""
        pairs = sorted(((iou(t.box, b), ti, bi) for ti, t in enumerate(self.tracks) for bi, b in enumerate(boxes)),
                       reverse=True)
        track_of: dict[int, Track] = {}
        taken: set[int] = set()
        for overlap, ti, bi in pairs:
            if overlap < self.iou_threshold:
                break
            if ti in taken or bi in track_of:
                continue
            taken.add(ti)
            track_of[bi] = self.tracks[ti]
        for ti, t in enumerate(self.tracks):
            if ti not in taken:
                t.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        result = []
        for bi, (box, p) in enumerate(zip(boxes, probabilities)):
            t = track_of.get(bi)
            if t is None:
                t = Track(self._next_id, tuple(box), deque(maxlen=self.smooth))
                self._next_id += 1
                self.tracks.append(t)
            t.box, t.missed = tuple(int(v) for v in box), 0
            t.history.append(np.asarray(p, dtype=np.float64))
            result.append(t)
        return result
