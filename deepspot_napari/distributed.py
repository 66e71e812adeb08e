"""Scale-out on a Dask distributed cluster (the optional `scale` extra: dask[distributed]).

The tasks are the files of a batch (small images, each processed whole by one worker) and the
blocks of large images (large.extrema_task and large.block_task, whose results the client puts
together exactly as a local run does, see large.run_blocks). Dask schedules them; nothing here
is a scheduler. Each worker process loads a model once (Model.cached, keyed by the weights file,
the device and the precision, loaded on the worker's machine: "auto" is each worker's own GPU when
it has a working one) and keeps it for every later task. Workers read
the inputs and write Zarr outputs by path, so a cluster spanning machines needs a shared file
system with the same paths; spots, small images' outputs and TIFF outputs of large images go
through the client.

Each worker's C core uses OMP_NUM_THREADS threads; Dask's nanny sets 1 by default, so run one
single-threaded worker per core (`dask worker ADDRESS --nworkers N --nthreads 1`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

from .io import MissingDependency, image_shape
from .large import FileJob, block_grid, blocked_size, process_file

def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependency("--scheduler needs Dask distributed: pip install 'deepspot-napari[scale]' "
                                "(or pip install 'dask[distributed]')") from exc
    return distributed


@contextlib.contextmanager
def connect(address: str, timeout: str | float | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client of the Dask scheduler at `address` (e.g. tcp://10.0.0.5:8786), or of a cluster
    started here and closed after: "local" (one single-threaded worker process per core) or
    "local:N" (N workers), on the loopback interface. timeout: for reaching the scheduler
    (default: Dask's distributed.comm.timeouts.connect setting, 30 s)."""
    distributed = _distributed()
    if address == "local" or address.startswith("local:"):
        n = address.partition(":")[2]
        n_workers = int(n) if n else (os.cpu_count() or 1)
        if n_workers < 1:
            raise ValueError(f"a local cluster needs at least one worker, got {address!r}")
        with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(address, **({} if timeout is None else {"timeout": timeout}))
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        yield client


def dask_mapper(client, progress: Callable[[int, int], None] | None = None):
    """A large.Mapper that runs the tasks on the cluster and yields their results in order."""

    def run(function, items: Sequence[tuple]) -> Iterator:
        items = list(items)
        if not items:
            return
        columns = list(zip(*items))
        futures = client.map(function, *columns, pure=False)
        try:
            for future in futures:
                yield future.result()
        finally:
            client.cancel(futures)

    return run


def _several_blocks(job: FileJob) -> bool:
    """Whether the job is worth spreading over the cluster block by block (else one task)."""
    block_size = blocked_size(job.path, job.block_size)
    if block_size is None:
        return False
    try:
        shape, _ = image_shape(job.path)
    except (ValueError, OSError):
        return False  # the file task reports it
    return len(block_grid(shape[-2], shape[-1], block_size)) > 1


def _file_task(job: FileJob) -> tuple[str, str]:
    """Runs on a worker: one small input, whole."""
    try:
        return "done", process_file(job)
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        return "FAILED", str(exc)


def run_jobs(client, jobs: Sequence[FileJob], progress: Callable[[int, int], None] | None = None,
             block_progress: Callable[[FileJob], Callable[[int, int], None] | None] | None = None
             ) -> Iterator[tuple[int, str, str]]:
    """Runs every job on the cluster: small inputs as one task each (all submitted at once),
    large ones block by block (one after the other, while the small ones run). Yields
    (index in jobs, status "done"/"FAILED", detail), small inputs as they finish."""
    distributed = _distributed()
    small, large = [], []
    for index, job in enumerate(jobs):
        (large if _several_blocks(job) else small).append(index)
    futures = {}
    for index in small:
        futures[client.submit(_file_task, jobs[index], pure=False)] = index
    done = 0
    try:
        for index in large:
            job = jobs[index]
            try:
                detail = process_file(job, mapper=dask_mapper(client),
                                      progress=block_progress(job) if block_progress else None)
                yield index, "done", detail
            except (ValueError, TypeError, OSError, MemoryError) as exc:
                yield index, "FAILED", str(exc)
        for future in distributed.as_completed(list(futures)):
            status, detail = future.result()
            done += 1
            if progress is not None:
                progress(done, len(futures))
            yield futures[future], status, detail
    finally:
        client.cancel(list(futures))
