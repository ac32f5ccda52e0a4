"""The ranks of a run on this machine, started by `mistral` itself: one process per rank.

`mistral generate MODEL_DIR "prompt" --num_tensor_ranks 2` starts two copies of the same
command, each with the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), and waits for them. What it adds to torchrun, which still
runs the same command (and is the way across several nodes):

- a failed run ends with the ranks' own lines only: rank 0's output passes straight
  through, the other ranks' lines come after it, each line once (every rank refuses a
  bad argument alike); torchrun prints a 30-line report of its own after them;
- a rank that fails ends the others: they get SIGTERM, and one that has not ended
  SECONDS_TO_END later (stopped, or hung in a collective) is killed and named;
- Ctrl-C or SIGTERM reaches every rank (each runs in a process group of its own, with
  whatever it starts), and no rank outlives the launcher, even one killed outright
  (`follow_launcher`);
- the exit code is that of the rank seen failing first (2 for an error the command explains).
"""

import codecs
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional

LAUNCHER_PID = "MISTRAL_LAUNCHER_PID"  # set in the ranks' environment: the process they follow
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# How long the other ranks have to end once one has failed (or a signal asked them to), before they are killed.
SECONDS_TO_END = 5.0


def follow_launcher() -> None:
    """In a rank this module started: die with the launcher, however it ends (SIGKILL, a closed
    terminal), so that no rank runs on without it. Linux only (prctl's parent-death signal)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher):  # it ended before the line above
        os._exit(128 + signal.SIGKILL)


def started_by_a_launcher() -> bool:
    """Whether this process is one rank of a run (torchrun's, or this module's)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(world_size: int, argv: list[str], seconds_to_end: float = SECONDS_TO_END) -> int:
    """Run `python -m mistral ARGV` as ranks 0..world_size-1 on this machine; returns the exit code.
    seconds_to_end: what the ranks have to end after a signal or a failed rank, before they are killed."""
    env = dict(
        os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **{LAUNCHER_PID: str(os.getpid())},
    )  # fmt: skip
    ranks = _Ranks([sys.executable, "-m", "mistral", *argv], world_size, env, seconds_to_end)
    try:
        return ranks.run()
    finally:
        ranks.kill()  # whatever is left after an exception or a second Ctrl-C


class _Ranks:
    def __init__(self, command: list[str], world_size: int, env: dict[str, str], seconds_to_end: float = SECONDS_TO_END):
        self.seconds_to_end = seconds_to_end
        self.processes: list[subprocess.Popen] = []
        try:
            for r in range(world_size):
                self.processes.append(subprocess.Popen(
                    command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, start_new_session=True,
                ))  # fmt: skip
        except OSError:
            self.kill()
            raise
        self.shown: list[str] = []  # rank 0's lines as they passed through, without their newline
        self.later: list[list[str]] = [[] for _ in self.processes]  # the other ranks' lines, shown at the end
        self.readers = [threading.Thread(target=self._read, args=(r,), daemon=True) for r in range(world_size)]
        for reader in self.readers:
            reader.start()
        self.asked: Optional[int] = None  # the signal that asked the run to stop

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._stop(signal.SIGTERM))
        try:
            failed = self._wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        killed = self._end() if failed is not None or self.asked is not None else []
        deadline = time.monotonic() + self.seconds_to_end
        for reader in self.readers:
            reader.join(timeout=max(deadline - time.monotonic(), 0))
        seen = set(self.shown)  # lines without their newline
        for lines in self.later:
            for line in list(lines):
                if line.rstrip("\n") not in seen:
                    seen.add(line.rstrip("\n"))
                    sys.stderr.write(line)
        if failed is not None:
            for r in killed:
                sys.stderr.write(f"error: rank {r} had not ended {self.seconds_to_end:g} s after rank {failed} failed (stopped or hung): killed\n")
            code = self.processes[failed].returncode
            return code if code > 0 else 128 - code  # as a shell reports a process that a signal ended
        return 0 if self.asked is None else 128 + self.asked

    def _wait(self) -> Optional[int]:
        """Until every rank has ended well (None), one has failed (its rank), or a signal asks to stop (None)."""
        while self.asked is None:
            try:
                for r, p in enumerate(self.processes):
                    if p.poll() not in (None, 0):
                        return r
                if all(p.returncode == 0 for p in self.processes):
                    return None
                time.sleep(0.05)
            except KeyboardInterrupt:  # Ctrl-C reached this process only: the ranks have groups of their own
                self._stop(signal.SIGINT)
        return None

    def _stop(self, signum: int) -> None:
        self.asked = signum
        self._signal(signum)

    def _end(self) -> list[int]:
        """Ask the ranks still running to end (SIGTERM, unless a signal already asked them); kill
        those that have not after seconds_to_end. Returns the ranks killed."""
        if self.asked is None:
            self._signal(signal.SIGTERM)
        deadline, killed = time.monotonic() + self.seconds_to_end, []
        for r, p in enumerate(self.processes):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL, [p])
                p.wait()
                killed.append(r)
        return killed

    def _signal(self, signum: int, processes: Optional[list[subprocess.Popen]] = None) -> None:
        for p in self.processes if processes is None else processes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)  # the rank and what it started (compile workers)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """End every rank at once: the launcher is leaving."""
        self._signal(signal.SIGKILL)
        for p in self.processes:
            p.wait()

    def _read(self, rank: int) -> None:
        """Rank 0's stderr through to ours as it comes (a progress line is rewritten in place); the others' kept for the end."""
        stream: Optional[IO[bytes]] = self.processes[rank].stderr
        assert stream is not None
        if rank > 0:
            self.later[rank].extend(line.decode(errors="replace") for line in stream)
            return
        decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            pending = self._pass_on(pending, decoder.decode(chunk))
        rest = self._pass_on(pending, decoder.decode(b"", final=True))
        if rest:
            self.shown.append(rest)

    def _pass_on(self, pending: str, text: str) -> str:
        """Write rank 0's text as it comes; keep its complete lines; return the unfinished last one."""
        sys.stderr.write(text)
        sys.stderr.flush()
        *complete, rest = (pending + text).split("\n")
        self.shown.extend(complete)
        return rest


def _free_port() -> int:
    """A port free now, for the ranks' rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
