"""Stale-temp cleanup removes only what emotion-dist can prove it wrote: user files and folders whose
names match every temp-name pattern (ours and older versions'), dated days back, survive the cleanup
in every folder it runs in; real temps of ours whose writer is gone are still removed."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from conftest import write_gray_clip

from emotion_dist.cli import main
from emotion_dist.utils import fsutil
from emotion_dist.utils.fsutil import (
    HOST,
    TEMP_DIR_OWNER,
    TEMP_MARKER,
    make_temp_dir,
    process_start_time,
    remove_stale_temps,
    temp_path,
)

DAYS = 24 * 3600


def _dead_pid() -> int:
    """A pid no process can have: above the kernel's pid limit."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        os.utime(p, (then, then), follow_symlinks=False)


def plant_user_files(folder: Path) -> dict[str, bytes]:
    """Files and folders of the user's whose names match each temp pattern emotion-dist has used,
    three days old. Returns {relative path: content} of every file planted."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "report.tmp1": b"a report",
        "scan.tmp2024": b"a scan",
        "backup.tmp2/thesis.docx": b"my thesis",  # a folder
        ".last.pt.tmp4242": b"old pattern, pid only",
        "notes.tmp77.npy": b"old pattern with a suffix",
        f".photos.tmp.{HOST}.{_dead_pid()}": b"old pattern, this host, a dead pid",
        ".video.mp4.tmp.otherhost.7.mp4": b"old pattern, another host",
        # our own marker, but a folder without its owner record: nothing proves emotion-dist made it
        f".album.{TEMP_MARKER}.{HOST}.{_dead_pid()}.1.0123abcd/holiday.jpg": b"a photo",
        f".album.{TEMP_MARKER}.otherhost.5.1.0123abcd/beach.jpg": b"another photo",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    for top in {Path(rel).parts[0] for rel in files}:
        _age(folder / top, 3 * DAYS)
    return files


def assert_intact(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, f"{rel} in {folder} was removed or changed"


def test_user_files_with_temp_like_names_survive_and_are_mentioned_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fsutil, "_said_unproven", False)
    files = plant_user_files(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / f".link.{TEMP_MARKER}.{HOST}.{_dead_pid()}.1.0123abcd"
    link.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="emotion_dist"):
        assert remove_stale_temps(tmp_path) == []
        assert remove_stale_temps(tmp_path, everything_ours=True) == []
    assert_intact(tmp_path, files)
    assert link.is_symlink() and target.is_dir()
    said = [r.getMessage() for r in caplog.records if "look like temp files" in r.getMessage()]
    assert len(said) == 1 and "cannot prove it wrote" in said[0], said


def test_our_temps_go_only_when_their_writer_is_provably_gone(tmp_path):
    me, start = os.getpid(), process_start_time(os.getpid())
    assert start is not None
    dead = tmp_path / f".a.pt.{TEMP_MARKER}.{HOST}.{_dead_pid()}.123.0123abcd"
    reused = tmp_path / f".b.pt.{TEMP_MARKER}.{HOST}.{me}.{start + 1}.0123abcd"  # our pid, another start time
    live = temp_path(tmp_path / "c.pt")  # this process: writing right now
    far_old = tmp_path / f".d.npy.{TEMP_MARKER}.otherhost.9.5.0123abcd"
    far_young = tmp_path / f".e.npy.{TEMP_MARKER}.otherhost.9.5.0123abcd"
    video = tmp_path / f".f.mp4.{TEMP_MARKER}.{HOST}.{_dead_pid()}.7.0123abcd.mp4"
    for p in (dead, reused, live, far_old, far_young, video):
        p.write_bytes(b"x")
    _age(far_old, 8 * DAYS)
    _age(far_young, 3 * DAYS)
    assert live.name.startswith(f".c.pt.{TEMP_MARKER}.{HOST}.{me}.{start}.")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, reused, far_old, video])
    assert live.exists() and far_young.exists()
    # a folder only this run writes to (checkpoints/, under the lease): every temp of ours goes
    assert sorted(remove_stale_temps(tmp_path, everything_ours=True)) == sorted([live, far_young])


def test_a_temp_folder_goes_only_with_its_owner_record(tmp_path):
    ours = make_temp_dir(tmp_path / "syn")
    (ours / "train").mkdir()
    (ours / "train" / "0.jpg").write_bytes(b"x")
    name = ours.name.split(f".{TEMP_MARKER}.")[1].split(".")
    dead = ours.rename(tmp_path / f".syn.{TEMP_MARKER}.{HOST}.{_dead_pid()}.{name[2]}.{name[3]}")
    (dead / TEMP_DIR_OWNER).write_text(dead.name)  # the record names the folder it is in
    wrong = tmp_path / f".other.{TEMP_MARKER}.{HOST}.{_dead_pid()}.1.0123abcd"
    wrong.mkdir()
    (wrong / TEMP_DIR_OWNER).write_text("another name")
    assert remove_stale_temps(tmp_path) == [dead]
    assert wrong.is_dir()


def _astronaut() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def test_every_folder_the_cleanup_runs_in_keeps_the_users_files(tmp_path, unit_checkpoint, capsys):
    """data synthetic --out's parent, predict --out, --json-out's parent, run.cache_dir, a video
    --out's parent and checkpoints/: each command runs for real, in-process, over planted files."""
    from emotion_dist.training.checkpoint import CheckpointFiles

    folders = {name: tmp_path / name for name in ("syn_parent", "ann", "json_parent", "cache", "video_parent")}
    planted = {name: plant_user_files(folder) for name, folder in folders.items()}
    # a real stale temp of ours in each: a writer on this host that is gone
    stale = {name: folder / f".x.{TEMP_MARKER}.{HOST}.{_dead_pid()}.1.0123abcd" for name, folder in folders.items()}
    for p in stale.values():
        p.write_bytes(b"torn")

    assert main(["data", "synthetic", "--out", str(folders["syn_parent"] / "syn"), "--train", "14", "--test", "7"]) == 0
    assert main(["predict", "--checkpoint", str(unit_checkpoint), str(_astronaut()), "--out", str(folders["ann"]),
                 "--json-out", str(folders["json_parent"] / "p.json")]) == 0
    video = write_gray_clip(tmp_path / "clip.mp4")
    assert main(["predict", "--checkpoint", str(unit_checkpoint), str(video), "--no-detect",
                 "--out", str(folders["video_parent"] / "clip_pred.mp4")]) == 0
    assert main(["data", "cache", "data.source=synthetic", "data.synthetic_train=14", "data.synthetic_test=7",
                 "data.image_size=32", f"run.cache_dir={folders['cache']}"]) == 0
    run = tmp_path / "run"
    files = CheckpointFiles(run)
    ckpt_planted = plant_user_files(files.dir)
    run_planted = plant_user_files(run)
    ckpt_stale = temp_path(files.dir / "last.pt")
    ckpt_stale.write_bytes(b"torn")
    assert files.clean_temps() == [ckpt_stale]
    capsys.readouterr()

    for name, folder in folders.items():
        assert_intact(folder, planted[name])
        assert not stale[name].exists(), f"the stale temp of ours in {name} was not removed"
    assert_intact(files.dir, ckpt_planted)
    assert_intact(run, run_planted)
    assert (folders["syn_parent"] / "syn" / "train").is_dir()
    assert not list((folders["syn_parent"] / "syn").rglob(TEMP_DIR_OWNER))
    assert (folders["ann"] / "astronaut_pred.png").is_file()
    assert (folders["video_parent"] / "clip_pred.mp4").is_file()


@pytest.mark.parametrize("old", ["x.tmp1", ".x.tmp.h.1", "x.tmp12.npy"])
def test_our_new_names_never_match_what_a_user_may_call_a_file(old, tmp_path):
    assert not fsutil._TEMP_RE.match(old)
    assert fsutil._TEMP_RE.match(temp_path(tmp_path / "x").name)
