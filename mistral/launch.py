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
- the exit code is the first failed rank's (2 for an error the command explains).
"""

import codecs
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional

# How long the other ranks have to end once one has failed, before they are killed.
SECONDS_TO_END = 5.0


def started_by_a_launcher() -> bool:
    """Whether this process is one rank of a run (torchrun's, or this module's)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(world_size: int, argv: list[str]) -> int:
    """Run `python -m mistral ARGV` as ranks 0..world_size-1 on this machine; returns the exit code."""
    env = dict(
        os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )  # fmt: skip
    ranks = [
        subprocess.Popen([sys.executable, "-m", "mistral", *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE)
        for r in range(world_size)
    ]
    later: list[list[str]] = [[] for _ in ranks]  # ranks > 0: their lines, shown at the end
    shown: list[str] = []  # rank 0's lines
    readers = [threading.Thread(target=_read, args=(p.stderr, r, shown, later[r]), daemon=True) for r, p in enumerate(ranks)]
    for reader in readers:
        reader.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: _signal_all(ranks, signal.SIGTERM))
    killed: list[int] = []
    try:
        failed = _wait_for_a_failure(ranks)
        if failed is not None:
            _signal_all(ranks, signal.SIGTERM)
            deadline = time.monotonic() + SECONDS_TO_END
            for r, p in enumerate(ranks):
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    killed.append(r)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for reader in readers:
        reader.join(timeout=10)
    seen = set(shown)
    for lines in later:
        for line in lines:
            if line not in seen:
                seen.add(line)
                sys.stderr.write(line)
    for r in killed:
        sys.stderr.write(f"error: rank {r} had not ended {SECONDS_TO_END:g} s after rank {failed} failed (stopped or hung): killed\n")
    if failed is None:
        return 0
    code = ranks[failed].returncode
    return code if code > 0 else 128 - code  # as a shell reports a process a signal ended


def _wait_for_a_failure(ranks: list[subprocess.Popen]) -> Optional[int]:
    """Wait until every rank has ended well (None) or one has failed (its rank)."""
    while True:
        try:
            for r, p in enumerate(ranks):
                if p.poll() not in (None, 0):
                    return r
            if all(p.returncode == 0 for p in ranks):
                return None
            time.sleep(0.05)
        except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group: wait for them
            pass


def _signal_all(ranks: list[subprocess.Popen], signum: int) -> None:
    for p in ranks:
        if p.poll() is None:
            p.send_signal(signum)


def _read(stream: Optional[IO[bytes]], rank: int, shown: list[str], later: list[str]) -> None:
    """Rank 0's stderr through to ours as it comes (a progress line is rewritten in place); the others' kept for the end."""
    assert stream is not None
    if rank > 0:
        later.extend(line.decode(errors="replace") for line in stream)
        return
    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        *complete, pending = (pending + text).split("\n")
        shown.extend(line + "\n" for line in complete)


def _free_port() -> int:
    """A port free now, for the ranks' rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
