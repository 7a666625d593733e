"""The progress bar of ``ringattn run``: tiles done over tiles planned, counted over every rank.

Simulated ranks are threads of one process: they share one ``Progress`` and count into it under a lock.
MPI ranks are processes: each counts its own tiles, and every rank other than 0 tells rank 0 how far it
has got, in a one-integer message (tag ``TAG``, far above the ring's tags), whenever it has done another
hundredth of its tiles, and once more at the end, marked final (sent as -1 - count, so that rank 0
stops waiting for a rank even if it computed fewer tiles than planned). Rank 0 adds up the latest count of every rank and
draws. It takes the messages in a thread of its own when MPI allows threads (``MPI_THREAD_MULTIPLE``),
so the bar moves while rank 0 itself is idle (under a causal contiguous layout rank 0 has the least
work, and the bar used to stop at rank 0's share); otherwise after each of its own tiles. ``close``
waits for every rank's final count, so no message is left unreceived and the bar ends at 100%.

The bar appears on stderr once a run has lasted two seconds: by default when stderr is a terminal
(rank 0's, under MPI: a launcher forwards it through a pipe, so pass ``--progress`` there).
"""

import sys
import threading
import time

import numpy as np

TAG = 1 << 20                 # the ring's tags are 3 * step + kind: far below this


class Progress:
    """Counts the tiles of ``totals`` (tiles per rank, all of them) and draws the whole job's fraction.

    ``ranks``: the ranks counting through this object (all of them for simulated ranks; this one under
    MPI). ``comm``: the MPI communicator (an ``MPIComm``), or None for simulated ranks.
    """

    def __init__(self, totals, enabled, comm=None):
        self.totals, self.enabled, self.comm = list(totals), enabled, comm
        self.total = max(sum(self.totals), 1)
        self.counts = [0] * len(self.totals)          # the latest count of every rank
        self.final = [False] * len(self.totals)       # rank 0: which ranks have sent their last count
        self.start = self.drawn = time.monotonic()
        self.lock = threading.Lock()
        self.sends, self.told = [], 0
        self.mine = 0 if comm is None else comm.rank
        self.listener = None
        if comm is not None and comm.rank == 0 and comm.size > 1:
            self.buffer = np.zeros(1, np.int64)
            if comm.MPI.Query_thread() == comm.MPI.THREAD_MULTIPLE:
                self.listener = threading.Thread(target=self._listen, name="progress", daemon=True)
                self.listener.start()

    def __call__(self):
        """One more tile done on the calling rank."""
        with self.lock:
            self.counts[self.mine if self.comm is not None else 0] += 1
        if self.comm is None or self.comm.rank == 0:
            if self.comm is not None and self.listener is None:
                self._receive(block=False)
            self._draw()
        elif self.counts[self.mine] >= self.told + max(1, self.totals[self.mine] // 100):
            self._tell()

    def _tell(self, final=False):
        """Rank > 0: send this rank's count to rank 0 (non-blocking; the buffer lives until it is sent)."""
        self.told = self.counts[self.mine]
        self.sends = [(req, buf) for req, buf in self.sends if not req.Test()]
        buf = np.array([-1 - self.told if final else self.told], np.int64)
        self.sends.append((self.comm.comm.Isend([buf, self.comm.MPI.INT64_T], 0, TAG), buf))

    def _receive(self, block):
        """Rank 0: take every count that has arrived (``block``: wait for one first)."""
        MPI, status = self.comm.MPI, self.comm.MPI.Status()
        while block or self.comm.comm.Iprobe(MPI.ANY_SOURCE, TAG, status):
            self.comm.comm.Recv([self.buffer, MPI.INT64_T], MPI.ANY_SOURCE, TAG, status)
            count, source = int(self.buffer[0]), status.Get_source()
            with self.lock:
                self.counts[source] = count if count >= 0 else -1 - count
                self.final[source] = self.final[source] or count < 0
            block = False

    def _finished(self):
        return all(self.final[1:])

    def _listen(self):
        while not self._finished():
            self._receive(block=False)
            self._draw()
            time.sleep(0.05)

    def _draw(self):
        with self.lock:
            done, now = sum(self.counts), time.monotonic()
            if not (self.enabled and now - self.start > 2.0 and (now - self.drawn > 0.1 or done == self.total)):
                return
            self.drawn = now
        frac = done / self.total
        sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {100 * frac:5.1f}%  {now - self.start:6.1f} s")
        sys.stderr.flush()

    def close(self):
        """Every rank: the last count reaches rank 0 (and rank 0 has them all); end the bar's line."""
        if self.comm is not None and self.comm.size > 1:
            if self.comm.rank > 0:
                self._tell(final=True)
                for req, _ in self.sends:
                    req.Wait()
            elif self.listener is not None:
                self.listener.join()
            else:
                while not self._finished():
                    self._receive(block=True)
        if self.comm is None or self.comm.rank == 0:
            self._draw()
            if self.enabled and self.drawn > self.start:
                sys.stderr.write("\n")
