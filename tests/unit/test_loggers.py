"""The logger sinks: every sink hears the same calls, and metrics.jsonl holds each step once after a resume."""

import io
import json

from emotion_dist.training.loggers import ConsoleSink, DiskWarnings, JsonlSink, RunLogger, Sink


class Recorder(Sink):
    def __init__(self):
        self.calls = []

    def epoch_start(self, *args):
        self.calls.append(("epoch_start", args))

    def stop_progress(self):
        self.calls.append(("stop_progress", ()))

    def log(self, record, step):
        self.calls.append(("log", record["type"], step))


def test_console_progress_is_one_more_sink():
    recorder, stream = Recorder(), io.StringIO()
    logger = RunLogger(True, [ConsoleSink(stream=stream, tty=False), recorder])
    logger.epoch_start(0, 2, 10, 0)
    logger.step(1, 10, {"type": "step", "step": 1, "loss": 1.5, "lr": 1e-3, "img_per_s": 100.0})
    logger.stop_progress()
    assert recorder.calls == [("epoch_start", (0, 2, 10, 0)), ("log", "step", 1), ("stop_progress", ())]


def test_a_resumed_run_drops_the_steps_logged_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"type": "step", "step": s, "loss": 1.0 / s} for s in range(1, 11)]
    records.insert(5, {"type": "epoch", "epoch": 1, "step": 5})
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    JsonlSink(path, DiskWarnings()).start(6)  # killed at step 10; last checkpoint at step 6
    kept = path.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in kept if line.startswith("{")]
    assert steps == [1, 2, 3, 4, 5, 5, 6] and kept[-1] == "not json"
    JsonlSink(path, DiskWarnings()).start(6)
    assert path.read_text().splitlines() == kept  # nothing past the step: the file is left as it is


def test_time_left_stops_at_train_max_steps():
    from emotion_dist.training.loggers import TimeLeft

    now = [0.0]
    t = TimeLeft(clock=lambda: now[0], max_steps=25)
    t.epoch_start(epoch=0, epochs=10, total_steps=10, done_steps=0)
    now[0] += 20.0
    t.step(4, global_step=4)  # 5 s per step
    t.eval_s = 6.0
    assert t.remaining(4) == (6 * 5.0 + 6.0, 36.0 + 1 * (50.0 + 6.0) + 5 * 5.0)  # this epoch, one more, 5 steps
    t.step(4, global_step=22)  # 3 steps left, fewer than the epoch's 6: the run ends mid-epoch
    assert t.remaining(4) == (15.0, 15.0)
