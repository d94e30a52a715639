"""A hung rank makes the others stop the run within --hang_timeout, naming it.

Without this, a rank that is SIGSTOPped, hung in native code while holding the GIL, or on a machine
that has disappeared leaves every other rank blocked in its next collective until --ddp_timeout
(30 min by default), and the gloo/NCCL timeout that finally comes does not say which rank is stuck.

Each rank runs two daemon threads around a key-value store client that trainers/runtime.py creates
and passes in (this module never imports torch.distributed; any object with `set`, `multi_get` and
`check` in TCPStore's manner will do):

- the beat thread, every `interval` seconds, writes this rank's heartbeat (a counter incremented at
  each beat, plus rank, host, pid, the optimizer steps this rank has finished in this run and its
  phase, "running" or "finished") and reads every rank's heartbeat in one `multi_get`;
- the judge thread asks `HangMonitor.verdict(now)` every second or so. That decision is pure: it
  sees only what the beat thread observed and the times, taken from this process's OWN monotonic
  clock, at which it saw each other rank's counter change, so clocks that differ between nodes do
  not matter. A rank whose counter has not moved for `timeout` seconds in this rank's reads, and
  which has not said "finished", is stuck; so is the store if no read has come back for `timeout`
  seconds (a TCPStore read on a stopped server blocks forever, which is why the judge is a thread of
  its own). Then this rank prints one line naming the stuck rank(s) or the store, and leaves with
  `os._exit(HUNG_EXIT_STATUS)`; the launcher (torchrun, deepspeed) sees a rank fail and tears the
  rest of the run down.

What it does not catch: a rank hung in native code that releases the GIL (e.g. blocked inside a
collective while the others wait elsewhere) keeps beating; --ddp_timeout still covers that.

Keys are `trainrig/heartbeat/<restart count>/<rank>` (TORCHELASTIC_RESTART_COUNT), so after a
torchrun restart on the same store no rank reads the previous attempt's beats.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

# Exit status of a rank that stopped the run because another rank (or the store) went silent.
# Distinct from 1 (the run failed), 2 (usage error) and 75 (stopped on a signal, resumable): 76 is
# sysexits.h EX_PROTOCOL, "remote error": the fault lies with a peer, not with this rank.
HUNG_EXIT_STATUS = 76
KEY_PREFIX = "trainrig/heartbeat"
RUNNING, FINISHED = "running", "finished"


def default_interval(timeout: float) -> float:
    """Seconds between beats: often enough that a rank goes stale well within `timeout`."""
    return min(5.0, timeout / 4)


def heartbeat_key(rank: int, restart_count: int = 0) -> str:
    return f"{KEY_PREFIX}/{restart_count}/{rank}"


@dataclass
class PeerState:
    """What this rank knows of another rank's heartbeat."""

    beat: int | None = None  # the counter last read; None: never heard from
    changed_at: float = 0.0  # this process's clock when the counter was first seen at its value
    payload: dict = field(default_factory=dict)


class HangMonitor:
    """The decision, without threads, store or clock of its own: feed it what the store returned
    (`observe`) and ask `verdict(now)`. All times are this process's monotonic clock."""

    def __init__(self, rank: int, world_size: int, timeout: float, now: float, *, store_address: str = "the store",
                 store_owner: str = "rank 0"):
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.store_address, self.store_owner = store_address, store_owner
        self.peers = {r: PeerState(changed_at=now) for r in range(world_size) if r != rank}
        self.started = now
        self.last_answer = now  # when a read of the store last came back
        self.grace_from = now  # the store's silence is counted from max(last_answer, grace_from)

    def observe(self, values: dict[int, bytes | str | dict], now: float) -> None:
        """One read of the store came back at `now`, with the heartbeats it found by rank (ranks
        whose key does not exist yet are absent)."""
        self.last_answer = now
        for r, raw in values.items():
            peer = self.peers.get(r)
            if peer is None:
                continue
            payload = parse_payload(raw)
            if payload is None:
                continue
            beat = payload.get("beat")
            if beat != peer.beat:
                peer.beat, peer.changed_at = beat, now
            peer.payload = payload

    def forgive(self, now: float) -> None:
        """This process itself was not running for a while (suspended, starved): what it did not
        see in that time says nothing about the others. Restart the store's clock; the peers' need
        no reset, as they are judged on reads only (see `stuck_ranks`)."""
        self.grace_from = max(self.grace_from, now)

    def store_silent_for(self, now: float) -> float:
        return now - max(self.last_answer, self.grace_from)

    def stuck_ranks(self) -> list[int]:
        """Ranks whose counter did not move for `timeout` s up to this rank's latest read, and that
        have not finished. Judged at the read's time, not now: a read that has not come back yet
        is the store's silence, not the ranks'."""
        return [r for r, peer in sorted(self.peers.items())
                if peer.payload.get("phase") != FINISHED and self.last_answer - peer.changed_at >= self.timeout]

    def verdict(self, now: float) -> str | None:
        """None while everything answers; else the one line to print before stopping this rank."""
        flag = f"stopping rank {self.rank} (--hang_timeout {self.timeout:g})"
        silent = self.store_silent_for(now)
        if silent >= self.timeout:
            return (f"the store at {self.store_address} (served by {self.store_owner} under this launcher) has not answered "
                    f"for {silent:.0f} s: {self.store_owner} is stopped, hung, or its machine or the network to it is gone; {flag}")
        stuck = self.stuck_ranks()
        if not stuck:
            return None
        what = ("it is stopped, hung in native code, or its machine is gone" if len(stuck) == 1 else
                "they are stopped, hung in native code, or their machines are gone")
        return f"{'; '.join(self.describe(r, now) for r in stuck)}: {what}; {flag}"

    def describe(self, r: int, now: float) -> str:
        peer = self.peers[r]
        if peer.beat is None:
            return f"rank {r} has not been heard from at all in the {now - self.started:.0f} s since this rank's watchdog started"
        p = peer.payload
        return (f"rank {r} (host {p.get('host', '?')}, pid {p.get('pid', '?')}) has not been heard from for "
                f"{now - peer.changed_at:.0f} s (last at step {p.get('steps', '?')} of this run)")


def parse_payload(raw) -> dict | None:
    if isinstance(raw, dict):
        return raw
    try:
        payload = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


class Watchdog:
    """The threads around a HangMonitor. `start()` once the process group exists, `note_step()`
    after each optimizer step, `finish()` when this rank is done (it is then never reported)."""

    def __init__(self, store, rank: int, world_size: int, timeout: float, *, interval: float | None = None,
                 restart_count: int | None = None, store_address: str = "the store", store_owner: str = "rank 0",
                 clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = os._exit,
                 stream=None):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, float(timeout)
        self.interval = default_interval(self.timeout) if interval is None else float(interval)
        if restart_count is None:
            restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.keys = [heartbeat_key(r, restart_count) for r in range(world_size)]
        self._rank_of = {key: r for r, key in enumerate(self.keys)}
        self.clock, self._exit, self._stream = clock, exit, stream
        self.monitor = HangMonitor(rank, world_size, timeout, clock(), store_address=store_address, store_owner=store_owner)
        self.steps, self.phase, self.beats = 0, RUNNING, 0
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._present: set[str] = set()  # keys known to exist (multi_get waits for missing ones)
        self._lock = threading.Lock()  # guards the monitor between the two threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ main thread

    def start(self) -> "Watchdog":
        self._threads = [threading.Thread(target=self._beat_loop, name="trainrig-heartbeat", daemon=True),
                         threading.Thread(target=self._judge_loop, name="trainrig-hang-judge", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def note_step(self) -> None:
        self.steps += 1

    def finish(self, wait: float = 2.0) -> None:
        """This rank is done: its last beat says so (written by the beat thread, never by the
        caller, which must not block on a store that has stopped answering), then both threads end."""
        self.phase = FINISHED
        self._stop.set()
        for thread in self._threads:
            thread.join(wait)

    def stop(self) -> None:
        """End the threads without marking this rank finished (tests, error paths)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(1.0)

    # ------------------------------------------------------------------ one round each

    def beat_once(self) -> None:
        """Write this rank's heartbeat, then read everyone's (one multi_get over the keys known
        to exist; a key not seen yet is probed with `check`, which does not wait)."""
        self.beats += 1
        payload = {"beat": self.beats, "rank": self.rank, "host": self.host, "pid": self.pid,
                   "steps": self.steps, "phase": self.phase}
        self.store.set(self.keys[self.rank], json.dumps(payload))
        self._present.add(self.keys[self.rank])
        for key in self.keys:
            if key not in self._present and self.store.check([key]):
                self._present.add(key)
        known = [k for k in self.keys if k in self._present]
        values = self.store.multi_get(known)
        now = self.clock()
        with self._lock:
            self.monitor.observe({self._rank_of[k]: v for k, v in zip(known, values)}, now)

    def check_once(self, now: float | None = None) -> str | None:
        """The judge's round: the verdict, and stopping this rank if there is one."""
        with self._lock:
            message = self.monitor.verdict(self.clock() if now is None else now)
        if message is None or self._stop.is_set():
            return None
        stream = self._stream or sys.stderr
        try:
            sys.stdout.flush()
            print(f"error: hang watchdog on rank {self.rank}: {message}", file=stream, flush=True)
        finally:
            self._exit(HUNG_EXIT_STATUS)
        return message

    # ------------------------------------------------------------------ threads

    def _beat_loop(self) -> None:
        while True:
            finishing = self._stop.is_set()
            try:
                self.beat_once()
            except Exception:  # the store refused or timed out: the judge sees no answer come back
                pass
            if finishing or self._stop.wait(self.interval):
                if not finishing and self.phase == FINISHED:
                    continue  # one more beat, saying "finished"
                return

    def _judge_loop(self) -> None:
        tick = min(1.0, self.interval)
        before = self.clock()
        while not self._stop.wait(tick):
            now = self.clock()
            if now - before > tick + max(self.interval, 2.0):  # this process was not running meanwhile
                with self._lock:
                    self.monitor.forgive(now)
            before = now
            self.check_once(now)
