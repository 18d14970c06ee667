"""Writing FER2013 challenge files and FER+ vote files in exactly their formats, for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FER_HEADER = "emotion,pixels,Usage"
ICML_HEADER = "emotion, Usage, pixels"
FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
FER_ORDER = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # fer2013.csv's emotion 0-6
TO_FERPLUS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "sad": "sadness",
              "surprise": "surprise", "neutral": "neutral"}


def pixels(img: np.ndarray) -> str:
    return " ".join(map(str, img.reshape(-1).tolist()))


def write_fer(path: Path, rows, header: str = FER_HEADER) -> Path:
    """rows: (emotion, pixel string, Usage), written in the header's column order, or a raw line."""
    lines = [header]
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        emotion, px, usage = row
        lines.append(f"{emotion},{px},{usage}" if header == FER_HEADER else f"{emotion},{usage},{px}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def synthetic_fer(folder: Path, per_class: dict[str, int], seed: int = 0) -> tuple[Path, Path]:
    """fer2013.csv drawn with the synthetic face generator (per_class: Usage -> images per class) and a
    matching fer2013new.csv: 7 votes for the face's emotion and 3 spread over others; every 9th
    image is dropped by FER+ (empty name), every 11th has an `unknown` majority."""
    from emotion_dist.data.readers.synthetic import CLASSES, draw_face

    fer, plus = [], [FERPLUS_HEADER]
    votes_order = FERPLUS_HEADER.split(",")[2:]
    row = 0
    for usage, n in per_class.items():
        for _i in range(n):
            for emotion in FER_ORDER:
                img = np.asarray(draw_face(CLASSES.index(emotion), np.random.default_rng([seed, row])))
                fer.append((str(FER_ORDER.index(emotion)), pixels(img), usage))
                votes = [0] * len(votes_order)
                main = "unknown" if row % 11 == 5 else TO_FERPLUS[emotion]
                votes[votes_order.index(main)] = 7
                votes[(votes_order.index(main) + 1 + row % 3) % 8] += 3
                name = "" if row % 9 == 4 else f"fer{row:07d}.png"
                plus.append(",".join([usage, name, *map(str, votes)]))
                row += 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fer2013new.csv").write_text("\n".join(plus) + "\n")
    return write_fer(folder / "fer2013.csv", fer), folder / "fer2013new.csv"
