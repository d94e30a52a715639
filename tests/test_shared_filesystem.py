"""The start-of-run check that every rank sees rank 0's files (trainers/setup.py
check_shared_filesystem), with a stand-in for the collectives: one rank's view at a time. The
two-node Slurm test (tests/slurm/test_sbatch.py) runs it for real, with a node-local directory."""

from pathlib import Path

import pytest

from trainers import setup
from trainers.errors import UsageError


class OneRank:
    """Rank `rank` of `world`; broadcasts deliver rank 0's value (`sent`, or this rank's own on rank 0),
    gathers return this rank's items plus `others`."""

    def __init__(self, rank: int, world: int, sent=None, others=()):
        self.rank, self.world_size, self.is_main = rank, world, rank == 0
        self.sent, self.others = sent, list(others)

    def broadcast_object(self, obj):
        return obj if self.is_main else self.sent

    def gather_objects(self, items):
        return list(items) + self.others


def places(tmp_path) -> dict:
    return {"--output_dir": tmp_path / "out", "--data_cache_dir": tmp_path / "cache"}


def test_rank_0_sees_its_own_probe_and_leaves_nothing_behind(tmp_path):
    setup.check_shared_filesystem(OneRank(0, 2), places(tmp_path))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [] and [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_a_rank_that_cannot_see_the_probe_stops_the_run_naming_its_node_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(setup, "SHARED_PROBE_WAIT_S", 0.3)
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-b12")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".trainrig-shared-f00d").write_text("f00d")  # the cache is shared, the output directory is not
    rank1 = OneRank(1, 4, sent=("f00d", None, "gpu-a07"), others=[("--output_dir", 3, "gpu-b12")])
    with pytest.raises(UsageError) as stopped:
        setup.check_shared_filesystem(rank1, places(tmp_path))
    message = str(stopped.value)
    assert message.startswith(f"--output_dir {tmp_path / 'out'}: rank 0 on node gpu-a07 wrote a file there that node gpu-b12 "
                              f"(ranks 1, 3) cannot see after 0.3 s"), message
    assert "not a node-local disk such as /tmp" in message and "shared storage" in message, message


def test_an_output_dir_rank_0_cannot_write_stops_every_rank(tmp_path):
    (tmp_path / "out").write_text("a file where the directory should be")
    with pytest.raises(UsageError, match=r"--output_dir .*/out: not writable"):
        setup.check_shared_filesystem(OneRank(0, 2), places(tmp_path))
    with pytest.raises(UsageError, match=r"--output_dir .*/out: not writable"):  # the others get rank 0's verdict
        setup.check_shared_filesystem(OneRank(1, 2, sent=(None, f"--output_dir {tmp_path / 'out'}: not writable (x)", "a")), places(tmp_path))


def test_one_process_checks_nothing_and_the_places_probed(tmp_path, monkeypatch):
    setup.check_shared_filesystem(OneRank(0, 1), {"--output_dir": tmp_path / "never-made"})
    assert not (tmp_path / "never-made").exists()
    monkeypatch.setenv("TRAINRIG_CACHE", str(tmp_path / "c"))

    class Cfg:
        class run:
            output_dir = str(tmp_path / "o")

        class data:
            data_cache_dir = ""

    assert list(setup.shared_places(Cfg).values()) == [tmp_path / "o", tmp_path / "c"]
    Cfg.data.data_cache_dir = str(tmp_path / "mine")
    assert setup.shared_places(Cfg) == {"--output_dir": tmp_path / "o", "--data_cache_dir": Path(tmp_path / "mine")}
    del Cfg.data.data_cache_dir  # a stage without a data cache (the reward model) probes its output directory alone
    assert setup.shared_places(Cfg) == {"--output_dir": tmp_path / "o"}
