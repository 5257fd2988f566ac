"""Chaos: SIGKILL at random moments (start-up, mid-epoch, while a checkpoint is written, between
stages, during the report), resume each time; then a full disk. Nothing lost, nothing doubled, and
the result equals an uninterrupted run bit for bit. benchmarks/chaos.py runs the same for longer."""
import random

import pytest

from benchmarks import chaos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("chaos")
    cfg = work / "chaos.yaml"
    cfg.write_text(chaos.CONFIG)
    wall = chaos.reference(cfg, work / "reference")
    return work, cfg, wall


KILLS = 12  # benchmarks/chaos.py --kills N runs as many as wanted


def test_a_dozen_kills_lose_nothing_and_change_nothing(setup):
    work, cfg, wall = setup
    rng = random.Random(1)
    total, rounds, kinds = 0, 0, set()
    while total < KILLS and rounds < 8:  # a round ends when the chain finishes; then a new one starts
        run = work / f"round_{rounds}"
        res = chaos.chaos_round(cfg, run, KILLS - total, wall, rng)
        chaos.verify(run, work / "reference")
        total, rounds = total + res["kills"], rounds + 1
        kinds |= set(res["kinds"])
    assert total >= KILLS and kinds >= {"time", "write"}


def test_full_disk_stops_cleanly_and_resumes_to_the_same_result(setup):
    work, cfg, _ = setup
    result = chaos.disk_full(cfg, work / "reference", work)
    if result.startswith("skipped"):
        pytest.skip(result)
    assert result.startswith("ok")


def test_verify_notices_a_doubled_epoch(setup, tmp_path):
    """The check itself can fail: a CSV with a repeated epoch is caught."""
    import shutil
    work, _, _ = setup
    run = tmp_path / "copy"
    shutil.copytree(work / "reference", run)
    csv = run / "student" / "epoch_log.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + lines[-1:]) + "\n")
    with pytest.raises(Exception, match="epochs must run 1..N"):
        chaos.verify(run, work / "reference")
