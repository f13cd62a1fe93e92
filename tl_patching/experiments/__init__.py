"""The experiments, one module each, each declaring itself once (``EXPERIMENT``, see `spec`).

`run_experiment` runs any of them by key with its inputs: a sentence, or an IOI dataset of ``n_prompts`` (1: the seed's
single pair) with an optional donor cache on disk. Importing this package imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tl_patching.experiments.spec import Experiment, Option, catalog, keys, load, register

__all__ = ["Experiment", "Option", "catalog", "keys", "load", "register", "run_experiment"]


def run_experiment(
    key: str,
    forward,
    n_prompts: int = 100,
    donor_cache: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
):
    """Experiment ``key`` with its defaults, overridden by ``options`` (None = default).

    A text experiment runs on its sentence (``text=``). An IOI experiment runs over ``n_prompts`` seeded prompts
    (1: the seed's single pair), at most its ``max_prompts``; with ``donor_cache`` the donor run of every batch (one
    per token length) is read from that file where it holds it (checked against model, weights and tokens), else
    computed and added to it, so the file serves any number of prompts and every experiment that reads the donor run.
    ``log`` receives a line saying which (e.g. the command line's output). Under torchrun (process group started by the
    caller), an experiment that splits prompts takes this rank's share; the others run on rank 0 only.
    """
    from tl_patching import distributed

    experiment = load(key)
    options = {k: v for k, v in options.items() if v is not None}
    if forward.backend not in experiment.backends:
        raise NotImplementedError(f"{experiment.title}: runs on the {' or '.join(experiment.backends)} backend only")
    progress = progress and distributed.is_main()
    if experiment.inputs == "text":  # one sentence: rank 0 runs it, the others receive the result
        return distributed.on_main(lambda: experiment.run(forward, **options))
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}")
    data = ioi_data(
        forward.model, n_prompts if experiment.max_prompts is None else min(n_prompts, experiment.max_prompts)
    )
    cache = None
    if donor_cache is not None and experiment.donor_names is not None:
        cache = _donor_cache(Path(donor_cache), forward, data, experiment.donor_names(forward.cfg.n_layers), log)
    if experiment.split_prompts:
        return experiment.run(forward, data, donor_cache=cache, progress=progress, **options)
    return distributed.on_main(lambda: experiment.run(forward, data, donor_cache=cache, progress=progress, **options))


def ioi_data(model, n_prompts: int):
    """The IOI batches of the main job: the seed's single pair for 1 prompt, else `prompts.ioi_dataset`."""
    from tl_patching.prompts import ioi_dataset, seed_pair

    return [seed_pair(model)] if n_prompts == 1 else ioi_dataset(model, n_prompts)


def _donor_cache(path: Path, forward, data, names: list[str], log: Callable[[str], None] | None) -> list[dict]:
    """One donor cache per batch of ``data``, from the file at ``path`` (see `cache_store.cached_runs`)."""
    from tl_patching import distributed
    from tl_patching.cache_store import cached_runs

    with distributed.main_first():  # rank 0 computes and saves what the file lacks, the others then load it
        caches, computed = cached_runs(path, forward, [(b.donor_tokens, b.prepend_bos) for b in data], names)
    if log is not None and distributed.is_main():
        n = len(data)
        log(
            f"donor cache {path}: the donor run of {n} batch{'es' if n != 1 else ''} loaded"
            if not computed
            else f"donor cache {path}: the donor run of {computed} of {n} batch{'es' if n != 1 else ''} computed and "
            "saved"
        )
    return caches
