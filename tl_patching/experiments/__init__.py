"""The five experiments (E1–E5), each a module whose `run(forward, …)` returns a typed, JSON-serialisable result."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = ("e1", "e2", "e3", "e4", "e5")
STEPS = EXPERIMENTS + ("circuit",)  # the main job: the five experiments, then the IOI circuit (path patching)
CIRCUIT_PROMPTS = 50  # at most this many of the main job's prompts go into the circuit search (it is the slow step)
TITLES = {
    "e1": "E1 — attention heads and raw-score distributions",
    "e2": "E2 — editing attention, MLP and hidden states",
    "e3": "E3 — head silencing and cosine similarity",
    "e4": "E4 — head vs hidden-state patching in IOI",
    "e5": "E5 — one head at one token",
    "circuit": "IOI circuit — path patching from the name movers back",
}


def run_experiment(key: str, forward, n_prompts: int = 100, donor_cache: Path | None = None, progress: bool = True, **options):
    """Experiment ``key`` with its defaults, overridden by ``options`` (None = default).

    E4/E5 run over an IOI dataset of ``n_prompts`` (1: the seed's single pair); with ``donor_cache`` the
    donor run is loaded from that file (checked against model and tokens), or computed and saved there.
    "circuit" finds the IOI circuit by exact path patching (`tl_patching.circuit`) over the first prompts.
    """
    from tl_patching import distributed
    from tl_patching.cache_store import cached_run
    from tl_patching.experiments import e1_attention_scores, e2_activation_editing, e3_cosine_similarity
    from tl_patching.experiments import e4_ioi_patching as e4, e5_head_token_patching as e5
    from tl_patching.prompts import ioi_dataset

    if key not in STEPS:
        raise ValueError(f"unknown experiment {key!r}; choose from {', '.join(STEPS)}")
    options = {k: v for k, v in options.items() if v is not None}
    distributed.init(forward.cfg.device)  # under torchrun only; rank 0 alone shows progress
    progress = progress and distributed.is_main()
    simple = {"e1": e1_attention_scores, "e2": e2_activation_editing, "e3": e3_cosine_similarity}
    if key in simple:  # one sentence each: rank 0 runs it, the others receive the result
        return distributed.on_main(lambda: simple[key].run(forward, **options))
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}")
    if key == "circuit":  # exact path patching over (at most CIRCUIT_PROMPTS of) the same IOI prompts
        from tl_patching import circuit

        if forward.backend != "tl":
            raise NotImplementedError("the circuit step runs exact path patching through TransformerLens's blocks: use the tl backend")
        data = [e4.seed_pair(forward.model)] if n_prompts == 1 else ioi_dataset(forward.model, min(n_prompts, CIRCUIT_PROMPTS))
        return distributed.on_main(lambda: circuit.run(forward, data))
    data = [e4.seed_pair(forward.model)] if n_prompts == 1 else ioi_dataset(forward.model, n_prompts)
    cache = None
    if donor_cache is not None:
        if len(data) > 1:
            raise ValueError(f"a donor cache holds one batch of prompts of one token length; these {n_prompts} prompts "
                             f"come in {len(data)} lengths. Use n_prompts=1, or no donor cache")
        batch = data[0]
        with distributed.main_first():  # rank 0 computes and saves it, the others load it
            cache = cached_run(donor_cache, forward, batch.donor_tokens, e4.donor_names(forward.cfg.n_layers), batch.prepend_bos)
    module = e4 if key == "e4" else e5
    return module.run(forward, data, donor_cache=cache, progress=progress, **options)
