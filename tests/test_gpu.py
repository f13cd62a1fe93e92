"""On CUDA: the experiments equal the CPU run, the fast path stays on the device, half precision within the
documented tolerances, a GPU cache loads on the CPU, torchrun with nccl, and a model split over two GPUs.

Skipped (with the reason) where PyTorch sees no CUDA device; run them on a GPU machine with ``pytest -m gpu``.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tl_patching import fast, prompts
from tl_patching.cache_store import load_cache, save_cache
from tl_patching.experiments import e4_ioi_patching as e4
from tl_patching.experiments import run_experiment
from tl_patching.forward import load_forward
from tl_patching.metrics import LogitDiff

REPO = Path(__file__).resolve().parents[1]
N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS == 0, reason="needs CUDA")]
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two CUDA devices")
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.1}  # nats, against float32 on the CPU (docs/scaling.md)


@pytest.fixture(scope="module")
def cpu():
    return load_forward("shipped", device="cpu")


def assert_results_close(a, b, fields, atol):
    for field in fields:
        x, y = getattr(a, field).float().cpu(), getattr(b, field).float().cpu()
        assert (x - y).abs().max() <= atol, field


E4_FIELDS = ("clean", "donor", "heads_patched", "resid_s2_patched", "resid_final_patched")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_experiments_on_cuda_equal_cpu(cpu, backend, dtype):
    gpu = load_forward("shipped", backend, "cuda", dtype)
    assert {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    for key, fields in (("e4", E4_FIELDS), ("e5", ("clean", "effect"))):
        ref = run_experiment(
            key, load_forward("shipped", backend, "cpu") if backend == "hf" else cpu, 8, progress=False
        )
        assert_results_close(run_experiment(key, gpu, 8, progress=False), ref, fields, TOLERANCE[dtype])


def test_fast_path_keeps_its_tensors_on_the_device():
    gpu = load_forward("shipped", device="cuda")
    batch = prompts.seed_pair(gpu.model)
    donor = gpu.run(batch.donor_tokens, cache=e4.donor_names(gpu.cfg.n_layers))[1]
    torch.cuda.set_sync_debug_mode("warn")  # every device→host copy or sync warns
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fast.final_position_head_sweep(
                gpu, batch.tokens, donor, LogitDiff(batch.correct, batch.wrong), progress=False
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda"
    from_fast = [w for w in caught if "synchroniz" in str(w.message) and w.filename.endswith("fast.py")]
    assert not from_fast, [f"{w.filename}:{w.lineno}" for w in from_fast]


def test_cache_saved_on_gpu_loads_on_cpu(cpu, tmp_path):
    gpu = load_forward("shipped", device="cuda")
    batch = prompts.seed_pair(gpu.model)
    names = e4.donor_names(gpu.cfg.n_layers)
    acts = gpu.run(batch.donor_tokens, cache=names)[1]
    path = save_cache(tmp_path / "donor.safetensors", acts, gpu.model, batch.donor_tokens, True)
    back = load_cache(path, cpu.model, batch.donor_tokens, device="cpu")  # same weights: the fingerprint matches
    assert all(back[n].device.type == "cpu" and torch.allclose(back[n], acts[n].cpu()) for n in names)


@two_gpus
@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_model_split_over_two_gpus_equals_one(cpu, backend):
    split = load_forward("shipped", backend, "cuda", n_devices=2)
    blocks = {str(p.device) for p in split.model.blocks.parameters()}
    assert blocks == {"cuda:0", "cuda:1"}
    methods = ("fast", "sweep") if backend == "tl" else ("sweep",)
    ref = run_experiment("e4", cpu, 8, progress=False)
    assert_results_close(run_experiment("e4", split, 8, progress=False), ref, E4_FIELDS, 1e-4)
    for method in methods:
        ref = run_experiment("e5", cpu, 8, progress=False, method=method)
        assert_results_close(run_experiment("e5", split, 8, progress=False, method=method), ref, ("effect",), 1e-4)


@two_gpus
def test_torchrun_nccl_two_processes_equal_one(cpu, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "tl_patching.cli",
        "reproduce",
        "--experiments",
        "e4,e5",
        "--n-prompts",
        "8",
        "--device",
        "cuda",
        "--no-png",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("e4", "e5"):
        got = json.loads((tmp_path / "shipped" / f"{key}_result.json").read_text())
        ref = json.loads(run_experiment(key, cpu, 8, progress=False).to_json())
        assert got["info"] == ref["info"]
        for field in ("clean",) + (("heads_patched",) if key == "e4" else ("effect",)):
            diff = (torch.tensor(got[field]["__tensor__"]) - torch.tensor(ref[field]["__tensor__"])).abs().max()
            assert diff <= 1e-4, (key, field)
