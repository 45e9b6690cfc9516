"""Where the jobs of a study run: worker processes here, Ray tasks, or SLURM jobs (submitit).

A launcher has one method that matters, ``submit(job, root, resume, wandb) -> Future``: the future of
:func:`run_job`, a ``{"wall_s": ...}`` or ``{"error": ..., "retry": ...}`` record. Everything else (which
job may start, what is done or to resume, retries, the report) is decided by
``reproduce.run_plan`` from the files, the same whatever the launcher. A job writes its files where
it runs: on a cluster, ``--out`` must be on a file system every node sees.

- ``local``: a pool of spawned worker processes on this machine, one GPU each if it has GPUs;
- ``ray``: one Ray task per job asking for its CPUs and GPUs (``pip install 'critical-tokens[ray]'``),
  on a local Ray instance or the cluster at ``--ray-address``;
- ``slurm``: one SLURM job per job through submitit (``pip install 'critical-tokens[slurm]'``), its
  submission files in ``OUT/submitit/``.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from ..runs import UserError

LAUNCHERS = ("local", "ray", "slurm")
SUBMITIT_CLUSTER: str | None = None  # None: submitit's choice (SLURM where sbatch exists); the tests set "local"


def run_job(execute: Callable, job, root: str, resume: bool, wandb: bool, threads: int) -> dict:
    """Runs ``execute(job, root, resume, wandb)`` where the launcher put it; a failure comes back as a
    record (its type and first line; the traceback is in the job's log), the same from every
    launcher. A problem with the job's input (UserError) would fail again: it is not to be retried."""
    import torch

    torch.set_num_threads(threads)
    try:
        return {"wall_s": execute(job, root, resume, wandb)}
    except Exception as e:  # noqa: BLE001 - reported by the scheduler, which goes on with the other jobs
        first_line = str(e).splitlines()[0] if str(e) else ""
        return {"error": f"{type(e).__name__}: {first_line}", "retry": not isinstance(e, UserError)}


def _worker_init(gpu_ids) -> None:
    if gpu_ids is not None:  # one GPU per worker process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())


class LocalLauncher:
    """Spawned worker processes on this machine; with GPUs, each worker keeps one (round robin)."""

    def __init__(self, execute: Callable, n_jobs: int, gpus: int, threads: int):
        self.execute, self.threads, self.n_jobs, self.gpus = execute, threads, n_jobs, gpus
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        gpu_ids = None
        if self.gpus:
            gpu_ids = context.Queue()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(self.gpus)]
            for worker in range(self.n_jobs):  # more jobs than GPUs share them
                gpu_ids.put(ids[worker % len(ids)])
        return ProcessPoolExecutor(max_workers=self.n_jobs, mp_context=context, initializer=_worker_init, initargs=(gpu_ids,))

    def submit(self, job, root: str, resume: bool, wandb: bool) -> Future:
        try:
            return self.pool.submit(run_job, self.execute, job, root, resume, wandb, self.threads)
        except BrokenProcessPool:  # a worker was killed (its jobs failed, to be retried): a new pool
            self.pool.shutdown(wait=False)
            self.pool = self._start()
            return self.pool.submit(run_job, self.execute, job, root, resume, wandb, self.threads)

    def shutdown(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayLauncher:
    """One Ray task per job, asking for ``threads`` CPUs and ``gpus`` GPUs (Ray sets CUDA_VISIBLE_DEVICES)."""

    def __init__(self, execute: Callable, address: str | None, threads: int, gpus: int):
        import ray

        self.execute, self.threads = execute, threads
        self.started = not ray.is_initialized()
        if self.started:  # address None: a local instance, stopped at the end
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(run_job)  # retries: run_plan's

    def submit(self, job, root: str, resume: bool, wandb: bool) -> Future:
        return self.task.remote(self.execute, job, root, resume, wandb, self.threads).future()

    def shutdown(self, cancel: bool = False) -> None:
        import ray

        if self.started:
            ray.shutdown()


class SlurmLauncher:
    """One SLURM job per job through submitit; a thread per running job waits for its result."""

    def __init__(self, execute: Callable, folder: str, n_jobs: int, threads: int, gpus: int, partition: str | None, minutes: int):
        import submitit

        self.execute, self.threads = execute, threads
        self.executor = submitit.AutoExecutor(folder=folder, cluster=SUBMITIT_CLUSTER)
        self.executor.update_parameters(timeout_min=minutes, cpus_per_task=threads, gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                                        **({"slurm_partition": partition} if partition else {}))
        self.waiting = ThreadPoolExecutor(max_workers=n_jobs)

    def submit(self, job, root: str, resume: bool, wandb: bool) -> Future:
        submitted = self.executor.submit(run_job, self.execute, job, root, resume, wandb, self.threads)
        return self.waiting.submit(submitted.result)

    def shutdown(self, cancel: bool = False) -> None:
        self.waiting.shutdown(wait=not cancel, cancel_futures=cancel)


def check_installed(launcher: str) -> None:
    """A UserError, before anything is written, for a launcher whose package is missing."""
    module = {"ray": "ray", "slurm": "submitit"}.get(launcher)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"--launcher {launcher} needs {module}: pip install 'critical-tokens[{launcher}]'") from None
