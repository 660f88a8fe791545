"""Stopping cleanly on a signal: SLURM's warning before a time limit or preemption, ``kill``, or Ctrl-C.

Every rank notes the signal; at the next step boundary the ranks agree (one all-reduce on a CPU group, so it costs
no device synchronisation), save a checkpoint, wait for it to be written, and exit
with :data:`PREEMPTED_EXIT_CODE`, which tells the launcher, SLURM or the user that rerunning continues the run.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Records the first stop signal; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self, group: dist.ProcessGroup | None) -> bool:
        """True on every rank when any rank has received a stop signal (a collective over the CPU ``group``: call it
        on all ranks)."""
        flag = torch.tensor([self.signal_name is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
