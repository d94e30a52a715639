"""The hang watchdog's decision (trainers/watchdog.py), with an in-memory store and a fake clock:
a silent rank is named once --hang_timeout has passed in this rank's reads, not before; a finished
rank is never named; a store that does not answer is reported as the store; this process's own
suspension accuses nobody. No threads: the rounds are driven by hand."""

from __future__ import annotations

import io
import json

import pytest

from trainers import watchdog
from trainers.watchdog import FINISHED, HUNG_EXIT_STATUS, HangMonitor, Watchdog, heartbeat_key


class FakeStore:
    """TCPStore's calls the watchdog uses; multi_get of a missing key fails (TCPStore would wait)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.answering = True

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        self._answer()
        return all(k in self.data for k in keys)

    def multi_get(self, keys):
        self._answer()
        missing = [k for k in keys if k not in self.data]
        assert not missing, f"multi_get would wait for {missing}"
        return [self.data[k] for k in keys]

    def _answer(self):
        if not self.answering:
            raise TimeoutError("store timeout")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class World:
    """`size` watchdogs sharing one store and one clock; exits are recorded, not taken."""

    def __init__(self, size=3, timeout=30.0, interval=5.0):
        self.store, self.clock, self.exits = FakeStore(), Clock(), []
        self.out = io.StringIO()
        self.dogs = [Watchdog(self.store, r, size, timeout, interval=interval, restart_count=0, clock=self.clock,
                              exit=self.exits.append, store_address="node-a:29500", store_owner="rank 0",
                              stream=self.out) for r in range(size)]

    def advance(self, seconds, beating=None, step=1.0):
        """Let `seconds` pass; the ranks in `beating` (default all) beat every `step` seconds."""
        beating = range(len(self.dogs)) if beating is None else beating
        end = self.clock.now + seconds
        while self.clock.now < end - 1e-9:
            self.clock.now = min(end, self.clock.now + step)
            for r in beating:
                self.dogs[r].beat_once()


def test_a_silent_rank_is_named_after_the_timeout_and_not_before():
    w = World(timeout=30)
    w.advance(10)
    for _ in range(4):
        w.dogs[1].note_step()
    w.advance(1)  # rank 1's last beat says 4 steps, then it stops
    w.advance(30, beating=[0, 2])  # rank 0 read rank 1's last beat at 112: 29 s of silence at 141
    assert w.dogs[0].check_once() is None and w.exits == []
    w.advance(1, beating=[0, 2])
    message = w.dogs[0].check_once()
    assert w.exits == [HUNG_EXIT_STATUS]
    assert message.startswith("rank 1 (host ") and f"pid {w.dogs[1].pid})" in message
    assert "has not been heard from for 30 s (last at step 4 of this run)" in message
    assert message.endswith("it is stopped, hung in native code, or its machine is gone; stopping rank 0 (--hang_timeout 30)")
    assert "rank 2" not in message
    assert w.out.getvalue() == f"error: hang watchdog on rank 0: {message}\n"
    assert w.dogs[2].check_once() is not None  # every survivor says it


def test_only_reads_count_a_judge_running_ahead_of_the_reads_accuses_nobody():
    w = World(timeout=30)
    w.advance(5)
    w.clock.now += 29  # nobody beat or read (this rank's beat thread is slow): too early for ranks,
    assert w.dogs[0].check_once() is None  # and the store is counted from the last read: 29 s
    w.advance(1)  # the next read sees everyone's counters moved
    w.clock.now += 10
    assert w.dogs[0].check_once() is None and w.exits == []


def test_a_finished_rank_is_never_named():
    w = World(timeout=30)
    w.advance(5)
    w.dogs[2].phase = FINISHED  # what finish() does before the last beat
    w.dogs[2].beat_once()
    w.advance(300, beating=[0, 1])
    assert w.dogs[0].check_once() is None and w.dogs[1].check_once() is None
    assert w.exits == []


def test_several_silent_ranks_in_one_line_and_a_never_seen_one():
    w = World(size=4, timeout=20)
    w.advance(3, beating=[0, 1, 2])  # rank 3 never beats
    w.advance(30, beating=[0])
    message = w.dogs[0].check_once()
    assert message.startswith("rank 1 (host ")
    assert "; rank 2 (host " in message and "; rank 3 has not been heard from at all in the 33 s since" in message
    assert "they are stopped, hung in native code, or their machines are gone; stopping rank 0 (--hang_timeout 20)" in message


def test_a_store_that_does_not_answer_is_reported_as_the_store():
    w = World(timeout=30)
    w.advance(5)
    w.store.answering = False
    for _ in range(29):
        w.clock.now += 1
        with pytest.raises(TimeoutError):
            w.dogs[1].beat_once()
    assert w.dogs[1].check_once() is None
    w.clock.now += 1.2
    message = w.dogs[1].check_once()
    assert message == ("the store at node-a:29500 (served by rank 0 under this launcher) has not answered for 30 s: rank 0 "
                       "is stopped, hung, or its machine or the network to it is gone; stopping rank 1 (--hang_timeout 30)")
    assert w.exits == [HUNG_EXIT_STATUS]


def test_this_process_suspended_forgives_the_store_and_accuses_no_rank():
    monitor = HangMonitor(0, 2, timeout=10, now=0.0)
    monitor.observe({0: json.dumps({"beat": 1}), 1: json.dumps({"beat": 1, "phase": "running"})}, now=1.0)
    monitor.forgive(now=60.0)  # we were stopped from 1 s to 60 s
    assert monitor.verdict(now=61.0) is None
    monitor.observe({1: json.dumps({"beat": 9, "phase": "running"})}, now=62.0)  # rank 1 kept beating
    assert monitor.verdict(now=70.0) is None
    assert monitor.verdict(now=72.5).startswith("the store at")  # 10 s without a read after that one


def test_keys_are_namespaced_by_restart_and_stale_beats_are_not_read(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    store, clock = FakeStore(), Clock()
    store.set(heartbeat_key(1, 1), json.dumps({"beat": 7, "phase": "running"}))  # the previous attempt's rank 1
    dog = Watchdog(store, 0, 2, 10, interval=2, clock=clock, exit=lambda status: None, stream=io.StringIO())
    assert dog.keys == ["trainrig/heartbeat/2/0", "trainrig/heartbeat/2/1"]
    dog.beat_once()
    assert dog.monitor.peers[1].beat is None


def test_the_threads_beat_finish_and_end():
    store = FakeStore()
    dog = Watchdog(store, 0, 1, timeout=0.4, clock=watchdog.time.monotonic, exit=pytest.fail, stream=io.StringIO()).start()
    assert dog.interval == 0.1  # timeout / 4
    dog.note_step()
    dog.finish()
    assert not any(t.is_alive() for t in dog._threads)
    last = json.loads(store.data[heartbeat_key(0)])
    assert last["phase"] == FINISHED and last["steps"] == 1 and last["beat"] >= 2
