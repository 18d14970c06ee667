"""Two jobs sharing one run.cache_dir (a sweep's parallel trials): a cache another job is still
publishing (its .npy renamed into place, its .json not yet written) is neither used nor taken for a
damaged one and removed; this job builds its own and both end with a whole cache."""

import numpy as np

from emotion_dist.data.cache import Decoder, build, open_cache


class Squares(Decoder):
    channels = 1

    def __init__(self, on_decode=None):
        self.on_decode = on_decode

    def __call__(self, item):
        if self.on_decode:
            self.on_decode()
        return np.full((8, 8, 1), int(item), np.uint8)

    def fingerprint(self, item) -> bytes:
        return str(item).encode()


def test_a_cache_another_job_is_publishing_is_left_alone_and_built_again(tmp_path):
    items, labels = ["1", "2", "3"], [0, 1, 0]
    first = build(tmp_path, items, labels, Squares(), cache_size=8)
    npy = first.path
    meta = npy.with_suffix(".json")
    record = meta.read_text()
    meta.unlink()  # the other job's moment between its two renames
    key = npy.stem
    assert open_cache(tmp_path, key) == (None, None)  # not there yet: not damaged either
    seen = []
    second = build(tmp_path, items, labels, Squares(on_decode=lambda: seen.append(npy.exists())), cache_size=8)
    assert seen and all(seen)  # the other job's .npy was never removed while this one decoded
    assert second.images[:, 0, 0, 0].tolist() == [1, 2, 3]
    meta.write_text(record)  # the other job finishes its publication: its cache opens whole
    cached, why = open_cache(tmp_path, key)
    assert why is None and cached.images[:, 0, 0, 0].tolist() == [1, 2, 3]
