"""All the cores by default on a machine without accelerators. `accelerate launch` gives each CPU
process one thread (OMP_NUM_THREADS=1) unless told otherwise, which leaves cores idle: each process
of a launch then uses the cores it may run on divided by the launch's processes on this machine,
unless the user chose a count (`--num_cpu_threads_per_process`, or OMP_NUM_THREADS set before
launching). Runs not started by `accelerate launch` keep torch's own choice (every core).

Example:
    >>> use_all_cores()  # doctest: +SKIP
    'CPU threads: 2 per process (2 cores / 1 process of this launch on this machine)'
"""

import os

import torch

CHOSEN_FLAG = b"--num_cpu_threads_per_process"


def launched_by_accelerate():
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set for every process `accelerate launch` starts


def _launcher_file(name):
    try:
        with open(f"/proc/{os.getppid()}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return None


def user_chose_threads():
    """Whether the launch's command or environment chose the thread count (None: cannot tell)."""
    command, environment = _launcher_file("cmdline"), _launcher_file("environ")
    if command is None or environment is None:
        return None
    return CHOSEN_FLAG in command or any(v.startswith(b"OMP_NUM_THREADS=") for v in environment.split(b"\0"))


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_all_cores():
    """Set this process's thread count as the module says; returns the line to log, or None."""
    if torch.accelerator.is_available() or not launched_by_accelerate():
        return None
    if user_chose_threads() is not False:
        return f"CPU threads: {torch.get_num_threads()} per process, as the launch chose"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, cores() // local)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for processes this one starts (data loading workers)
    return (f"CPU threads: {threads} per process ({cores()} cores / {local} process(es) of this launch on this "
            "machine; --num_cpu_threads_per_process N chooses)")
