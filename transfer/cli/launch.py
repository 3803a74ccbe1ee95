"""`transfer train trainer.processes=N`: start N processes of this same command on this machine through
torchrun's own launcher (torch.distributed.launcher), for users who do not want to learn torchrun.

The command line is passed on unchanged: each process sees torchrun's environment (RANK, WORLD_SIZE …) and
trains its share (transfer.distributed). Ctrl-C reaches every process, which stops after its step with one
last.pt; a process that dies makes the launcher end the others. Several machines: run torchrun on each
(README, "More processes and machines").
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid

from transfer.errors import UserError

IMPORTED = time.time()  # when the command's package was imported: process_started's fallback
_command_started: float | None = None  # set by transfer.cli.main: when this command began


def mark_command_start(whole_process: bool) -> None:
    """The `transfer` command counts its start-up from the process's birth (interpreter and imports included);
    `main([...])` called inside a longer-lived process (a script, a test) counts from the call."""
    global _command_started
    _command_started = process_started() if whole_process else time.time()


def command_started() -> float:
    return _command_started if _command_started is not None else process_started()


def process_started() -> float:
    """When this process began (time.time()), so the start-up a run reports includes the interpreter and its
    imports: the process's age from /proc (10 ms ticks) on Linux; elsewhere, when transfer.cli was imported."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command name
            age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return IMPORTED
    return time.time() - age if age >= 0 else IMPORTED


def check_processes(processes, under_torchrun: bool, local_processes: int) -> int:
    """trainer.processes as a count; under torchrun it must agree with torchrun's --nproc_per_node."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise UserError(f"trainer.processes={processes}: give a whole number of processes, 1 or more.")
    if under_torchrun and processes not in (1, local_processes):
        raise UserError(f"trainer.processes={processes}, but torchrun started {local_processes} processes on this "
                        "machine. Drop trainer.processes when launching with torchrun (its --nproc_per_node decides).")
    return processes


def launch(processes: int, command: list[str]) -> int:
    """Run `python -m transfer COMMAND` in `processes` processes on this machine; their exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # the processes speak for themselves
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))  # as torchrun does: no oversubscription
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "transfer", *command)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal no process could report
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"transfer {command[0]}: process {rank} was killed by {name}; the others were stopped.",
                  file=sys.stderr)
            return 128 - code
        return code
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0
