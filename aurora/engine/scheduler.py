"""Which sequences run: a FIFO of waiting requests, running ones packed into batch rows 0..B-1.
Pure Python. When a sequence leaves, the last running one moves into its row, so rows stay packed
and the model runner can attend over a plain slice of its caches."""
from collections import deque

from aurora.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_batch: int, max_prefills_per_step: int = 8, admission_wait: int = 0):
        """admission_wait W: while sequences decode, a waiting group smaller than what could be admitted at once
        (the free rows, at most max_prefills) waits up to W steps for more arrivals, so that requests arriving
        spread out share one prefill call instead of pausing every running row for one call each (TGI's
        max_waiting_tokens). 0: admit at every step."""
        self.max_batch = max_batch
        self.max_prefills = max_prefills_per_step
        self.admission_wait = admission_wait
        self.waited = 0  # steps the waiting group has been held back so far
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = row

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows; they are prefilled this step."""
        if self.waited < self.admission_wait and self.running and self.waiting and \
                len(self.waiting) < min(self.max_batch - len(self.running), self.max_prefills):
            self.waited += 1
            return []
        self.waited = 0
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and len(admitted) < self.max_prefills:
            seq = self.waiting.popleft()
            seq.row, seq.status = len(self.running), Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> tuple[int, int] | None:
        """Take a finished or aborted sequence out; returns (src_row, dst_row) if a row must move."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
            return None
        row, last = seq.row, len(self.running) - 1
        seq.status, seq.row = Status.FINISHED, -1
        moved = self.running.pop()
        if row == last:
            return None
        self.running[row] = moved
        moved.row = row
        return last, row

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
