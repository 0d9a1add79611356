"""The data step on Ray Data: the per-unit and per-bucket work of `raycpt.core.data.shards` as actor pools (one
tokenizer per actor, built once), streamed back to the driver as each finishes. The blocks are the same as the
in-process path's, whatever the number of workers (units and buckets are fixed by the corpus, not by Ray)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ray

from raycpt.core.data.shards import map_in_process
from raycpt.edge.session import ray_session


class RayDataMapper:
    """A `raycpt.core.data.shards.Mapper` on Ray Data. Ray is joined or started (`ray_session`) only when some work has
    two or more items, and left as found when the `with` block ends; `workers` caps the actors per stage (default:
    the cluster's CPUs); `dashboard=False` where no Tune run follows in the same session (`raycpt prepare`);
    `num_gpus` per actor (`raycpt augment` with resources.use_gpu: one generator per GPU) also caps the actors at
    the cluster's GPUs over it."""

    def __init__(self, workers: int | None = None, num_cpus: int | None = None, dashboard: bool = True,
                 num_gpus: float = 0) -> None:
        self.workers, self.num_cpus, self.dashboard, self.num_gpus = workers, num_cpus, dashboard, num_gpus
        self._session = contextlib.ExitStack()

    def __enter__(self) -> RayDataMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.close()

    def __call__(self, worker: type, args: tuple, items: list[dict]) -> Iterator[dict]:
        if len(items) < 2:  # nothing to spread: no Ray start for a one-unit corpus
            yield from map_in_process(worker, args, items)
            return
        if not ray.is_initialized():
            self._session.enter_context(ray_session(self.num_cpus, self.dashboard))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if self.num_gpus:
            cpus = min(cpus, int(ray.cluster_resources().get("GPU", 0) // self.num_gpus))
        size = max(1, min(len(items), self.workers or cpus, cpus))
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ray.data.DataContext.get_current().enable_progress_bars = False  # raycpt draws its own (documents, MB/s)
        results = ds.map(worker, fn_constructor_args=args, compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1,
                         **({"num_gpus": self.num_gpus} if self.num_gpus else {}))
        yield from results.iter_rows()
