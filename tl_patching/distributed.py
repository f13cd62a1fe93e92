"""Beyond one process: data-parallel sweeps under ``torchrun``, dtypes, and models split across devices.

Data parallelism. A dataset-level run (any sweep over IOI batches) measures every prompt
independently, so prompts can be spread over processes and the per-prompt numbers put back together.
`map_batches` does exactly that and nothing else: launched by ``torchrun --nproc_per_node=N`` (one or
several nodes), rank r takes prompts r, r+N, r+2N, … of the dataset's own order (strided, so every rank
gets a share of every token length), runs the same per-batch function on its sub-batches, and every
rank receives all ranks' per-prompt tensors (``all_gather_object``) back in the one-process order. What
is computed from them afterwards (means, bootstrap intervals) is therefore computed on the same values
as in one process. Without torchrun (``WORLD_SIZE`` unset or 1) it is a plain loop and needs nothing.
The process group is started by `setup` (the command line calls it): gloo on the CPU, nccl on CUDA.
Only rank 0 should write files or show progress bars (`is_main`).

Dtype and placement (used by `tl_patching.forward.load_forward`'s ``dtype`` and ``n_devices``): with more than one
device the `HookedTransformer`'s blocks are spread over consecutive CUDA devices the way TransformerLens's forward
expects (``n_devices`` in its config), and the HF mirror is dispatched with an accelerate ``device_map`` that mirrors
the same split.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- who am I: rank, world size, process group ---


def launched() -> bool:
    """True when started by torchrun (or SLURM through it) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, prints and shows progress bars."""
    return rank() == 0


def backend_for(device: str | torch.device) -> str:
    """gloo for a model on the CPU, nccl for one on CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: str | torch.device = "cpu") -> bool:
    """Start the process group if launched by torchrun and not started yet; returns whether one is running."""
    if not launched():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return True


def setup(device: str = "cpu", n_devices: int = 1) -> str:
    """The device this process should load its model on; starts the process group under torchrun.

    On CUDA under torchrun, local rank r uses devices ``cuda:r·n_devices`` … ``cuda:r·n_devices + n_devices − 1``
    (its first one is returned and made current, which nccl needs). Elsewhere ``device`` is returned unchanged.
    Ranks other than 0 get HF's progress bars switched off.
    """
    if not launched():
        return device
    if torch.device(device).type == "cuda":
        first = local_rank() * n_devices
        device = f"cuda:{first}"
        check_devices(device, n_devices)
        torch.cuda.set_device(first)
    init(device)
    if not is_main():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return device


def teardown() -> None:
    """End the process group (if this process started one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(fn: Callable[[], object]) -> object:
    """``fn()`` computed on rank 0 only and handed to every rank (one process: just ``fn()``).

    For work that is not split (an experiment on one sentence): the other ranks wait instead of repeating it.
    """
    if not running():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first, the others after it finished (e.g. rank 0 writes a cache the others then read)."""
    running_ = running()
    if running_ and not is_main():
        dist.barrier()
    yield
    if running_ and is_main():
        dist.barrier()


def running() -> bool:
    """True when this process is one of several under torchrun, with its process group started by `setup` (the
    command line calls it; a script of your own must too). The library never starts one itself."""
    if not launched():
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "launched by torchrun, but no process group: call tl_patching.distributed.setup(device) first "
            "(the tl-patching command does)"
        )
    return True


# --- data parallel: shard the prompts, run, gather in the one-process order ---


def shard(n_prompts: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices rank ``rank`` of ``world_size`` takes: rank, rank + world_size, … (deterministic)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(range(rank, n_prompts, world_size))


def select(batch, rows: Sequence[int]):
    """The `IOIBatch` of only ``rows`` (indices into ``batch``), in that order."""
    from tl_patching.prompts import IOIBatch

    idx = torch.as_tensor(list(rows), dtype=torch.long)
    pick = lambda texts: [texts[i] for i in rows] if texts else []  # noqa: E731
    return IOIBatch(
        batch.tokens[idx],
        batch.donor_tokens[idx],
        batch.correct[idx],
        batch.wrong[idx],
        pick(batch.texts),
        pick(batch.donor_texts),
        batch.prepend_bos,
    )


def _select_cache(cache: dict[str, Tensor] | None, rows: Sequence[int], batch_size: int) -> dict[str, Tensor] | None:
    """A donor cache cut to ``rows`` (tensors with one row per prompt; a single broadcast row is kept)."""
    if cache is None:
        return None
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return {n: t[idx.to(t.device)] if t.shape[0] == batch_size and batch_size > 1 else t for n, t in cache.items()}


def _as_tuple(out) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _on_cpu(out) -> tuple[Tensor, ...]:
    """Per-prompt values on the CPU, half precision widened to float32 (what JSON, plots and bootstraps read)."""
    return tuple(
        t.detach().cpu().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach().cpu()
        for t in _as_tuple(out)
    )


def _cat(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return tuple(torch.cat([p[i] for p in parts], dim=-1) for i in range(len(parts[0])))


def _dataset_digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.tokens, b.donor_tokens, b.correct, b.wrong):
            h.update(str(t.tolist()).encode())
    return h.hexdigest()


def map_batches(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    batches: Sequence,
    donor_cache: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """``fn(batch, donor_cache)`` over every batch, per-prompt outputs (prompt axis last) concatenated in batch order.

    Under torchrun each rank runs ``fn`` on its `shard` of the prompts only, and every rank returns the
    whole dataset's tensors in the same order as one process would. Either way they come back on the CPU,
    float16/bfloat16 widened to float32. ``donor_cache`` (one batch's donor activations, a list of them, one per
    batch, or None) is cut to the same rows. ``fn`` returns a tensor or a tuple of several.
    """
    batches = list(batches)
    caches = [donor_cache] * len(batches) if donor_cache is None or isinstance(donor_cache, dict) else list(donor_cache)
    if not running():
        out = _cat([_on_cpu(fn(b, c)) for b, c in zip(batches, caches)])
        return out if len(out) > 1 else out[0]
    sizes = [len(b) for b in batches]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    mine = shard(sum(sizes), rank(), world_size())
    local_parts, local_order = [], []
    for b, cache, start, size in zip(batches, caches, offsets, sizes):
        rows = [g - start for g in mine if start <= g < start + size]
        if rows:
            local_parts.append(_on_cpu(fn(select(b, rows), _select_cache(cache, rows, size))))
            local_order += [start + r for r in rows]
    local = _cat(local_parts) if local_parts else None
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (_dataset_digest(batches), local_order, local))
    if len({digest for digest, _, _ in gathered}) != 1:
        raise RuntimeError(
            "the ranks built different datasets (different --n-prompts, seed or model?): every rank "
            "must be started with the same arguments"
        )
    template = next(part for _, _, part in gathered if part is not None)
    out = tuple(torch.empty(*t.shape[:-1], sum(sizes), dtype=t.dtype) for t in template)
    for _, order, part in gathered:
        if part is not None:
            for whole, piece in zip(out, part):
                whole[..., order] = piece
    return out if len(out) > 1 else out[0]


# --- dtype and devices ---


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_devices(device: str | torch.device, n_devices: int) -> list[torch.device]:
    """The ``n_devices`` consecutive devices starting at ``device`` (TransformerLens's layout), or a clear error."""
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    device = torch.device(device)
    if n_devices == 1 and device.type != "cuda":
        return [device]
    if device.type != "cuda":
        raise ValueError(f"splitting a model over {n_devices} devices needs CUDA devices; got device {str(device)!r}")
    first = device.index or 0
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if first + n_devices > available:
        raise ValueError(
            f"n_devices={n_devices} from cuda:{first} needs cuda:{first}…cuda:{first + n_devices - 1}, "
            f"but this machine has {available} CUDA device(s)"
        )
    if n_devices == 1:
        return [device]
    return [torch.device("cuda", first + i) for i in range(n_devices)]


def block_devices(n_layers: int, devices: Sequence[torch.device | str]) -> list[torch.device]:
    """The device of each block: consecutive runs of layers per device, as TransformerLens's
    ``get_device_for_block_index`` computes it (its forward moves the residual stream there)."""
    return [torch.device(devices[(layer * len(devices)) // n_layers]) for layer in range(n_layers)]


def place(model, devices: Sequence[torch.device]):
    """Move a `HookedTransformer` onto ``devices``: embeddings with block 0, block l on ``block_devices``, final
    norm and unembedding with the last block. Returns the model.

    (TL 3.9's own ``move_model_modules_to_device`` puts each module on whichever device has the most free
    memory at that moment, which need not match the device its forward moves the residual stream to.)
    """
    from tl_patching import lens

    if lens.is_bridge(model):
        if len(devices) > 1:  # the bridge's forward runs the HF model's; splitting that is HF's device_map, not this
            raise NotImplementedError(
                f"a model over {len(devices)} devices on TransformerLens {lens.TL_VERSION} (a TransformerBridge): "
                "tl_patching places HookedTransformer's blocks (TransformerLens 3); use one device per process"
            )
        return model.to(devices[0])
    model.cfg.device = str(devices[0])
    model.cfg.n_devices = len(devices)
    if len(devices) == 1:
        return model.to(devices[0], print_details=False)
    per_block = block_devices(model.cfg.n_layers, devices)
    for module in (
        model.embed,
        model.hook_embed,
        getattr(model, "pos_embed", None),
        getattr(model, "hook_pos_embed", None),
    ):
        if module is not None:
            module.to(per_block[0])
    for block, device in zip(model.blocks, per_block):
        block.to(device)
    for module in (getattr(model, "ln_final", None), model.unembed):
        if module is not None:
            module.to(per_block[-1])
    return model


def hf_device_map(n_layers: int, devices: Sequence[torch.device]) -> dict[str, str]:
    """An accelerate ``device_map`` for an HF GPT-2 that splits its blocks as `place` splits the TL model's.

    ``lm_head`` shares its weight with ``wte``, so both stay on the first device.
    """
    per_block = [str(d) for d in block_devices(n_layers, devices)]
    return {
        "transformer.wte": per_block[0],
        "transformer.wpe": per_block[0],
        "transformer.drop": per_block[0],
        **{f"transformer.h.{l}": d for l, d in enumerate(per_block)},
        "transformer.ln_f": per_block[-1],
        "lm_head": per_block[0],
    }
