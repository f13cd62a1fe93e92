"""Beyond one process on a CPU machine: prompt shards gathered back in order (simulated ranks and a real
2-process torchrun with gloo), dtypes, caches from another device, and model-parallel placement and its checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from tl_patching import distributed, fast, lens, patching, prompts
from tl_patching.cache_store import load_cache, read_header, save_cache
from tl_patching.edits import act_name
from tl_patching.experiments import e4_ioi_patching as e4
from tl_patching.experiments import e5_head_token_patching as e5
from tl_patching.experiments import run_experiment
from tl_patching.forward import Forward, load_forward
from tl_patching.metrics import LogitDiff, logit_diff
from tl_patching.prompts import ioi_batches, ioi_prompts
from tl_patching.recipe.word_tokenizer import word_tokenizer
from tl_patching.testing import random_gpt2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ioi_model():
    prompts = ioi_prompts(200)
    texts = [p.text for p in prompts] + [p.donor().text for p in prompts] + [" " + p.io for p in prompts]
    _, tl = random_gpt2(n_layers=3, n_heads=4, d_head=8, seed=4, tokenizer=word_tokenizer(texts), n_ctx=64)
    return tl


@pytest.fixture(scope="module")
def batches(ioi_model):
    out = ioi_batches(ioi_model, ioi_prompts(9, seed=2))
    assert len(out) > 1  # several token lengths: the shards cut across batches
    return out


def test_shards_cover_every_prompt_once():
    for n, world in [(9, 2), (9, 4), (3, 5), (1, 2)]:
        shards = [distributed.shard(n, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert shards == [distributed.shard(n, r, world) for r in range(world)]  # deterministic
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        distributed.shard(5, 2, 2)


def test_plain_run_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init("cpu") is False and distributed.setup("cpu") == "cpu"
    assert distributed.on_main(lambda: 42) == 42
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:1") == "nccl"


def simulated_ranks(monkeypatch, world: int, compute):
    """``compute()`` as every rank of a ``world``-process run, in this process: each rank's contribution to
    ``all_gather_object`` is recorded, then rank 0 runs again and receives all of them. Returns rank 0's result."""
    contributions: dict[int, object] = {}
    current = {"rank": 0}

    class Recorded(Exception):
        pass

    def all_gather_object(out, obj):
        contributions[current["rank"]] = obj
        if len(contributions) < world:
            raise Recorded
        out[:] = [contributions[r] for r in range(world)]

    monkeypatch.setattr(distributed, "running", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: current["rank"])
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    for r in list(range(1, world)) + [0]:
        current["rank"] = r
        try:
            result = compute()
        except Recorded:
            continue
    return result


@pytest.mark.parametrize("world", [3])
def test_sharded_e4_e5_equal_one_process(ioi_model, batches, monkeypatch, world):
    forward = Forward(ioi_model)
    one4, one5 = e4.run(forward, batches, progress=False), e5.run(forward, batches, progress=False)
    many4 = simulated_ranks(monkeypatch, world, lambda: e4.run(forward, batches, progress=False))
    many5 = simulated_ranks(monkeypatch, world, lambda: e5.run(forward, batches, progress=False))
    for field in ("clean", "donor", "heads_patched", "resid_s2_patched", "resid_final_patched"):
        torch.testing.assert_close(getattr(many4, field), getattr(one4, field), atol=1e-5, rtol=0)
    torch.testing.assert_close(many5.effect, one5.effect, atol=1e-5, rtol=0)
    assert many4.info == one4.info and many5.info == one5.info  # same prompts, same order
    for a, b in zip(many4.heads_summary, one4.heads_summary):  # bootstrap on the gathered values
        assert a.n == b.n and abs(a.mean - b.mean) <= 1e-5 and abs(a.ci_low - b.ci_low) <= 1e-5


def test_a_rank_without_prompts_and_a_sliced_donor_cache(ioi_model, batches, monkeypatch):
    forward = Forward(ioi_model)
    batch = batches[-1]
    donor = forward.run(batch.donor_tokens, cache=e4.donor_names(ioi_model.cfg.n_layers))[1]
    one = e5.run(forward, batch, donor_cache=donor, progress=False)
    world = len(batch) + 1  # the last rank gets no prompt at all
    many = simulated_ranks(monkeypatch, world, lambda: e5.run(forward, batch, donor_cache=donor, progress=False))
    torch.testing.assert_close(many.effect, one.effect, atol=1e-5, rtol=0)


def test_ranks_with_different_datasets_are_refused(ioi_model, batches, monkeypatch):
    forward = Forward(ioi_model)
    calls = iter([batches, batches[:1]])
    with pytest.raises(RuntimeError, match="different datasets"):
        simulated_ranks(monkeypatch, 2, lambda: e5.run(forward, next(calls), progress=False))


def _flat(value, path=""):
    if isinstance(value, dict):
        if "__tensor__" in value:
            yield from _flat(value["__tensor__"], path)
            return
        for k, v in value.items():
            yield from _flat(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flat(v, f"{path}[{i}]")
    else:
        yield path, value


def assert_same_json(a: dict, b: dict, atol: float = 1e-5) -> None:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    assert fa.keys() == fb.keys()
    for k, x in fa.items():
        if isinstance(x, float) or isinstance(fb[k], float):
            assert abs(x - fb[k]) <= atol, k
        else:
            assert x == fb[k], k


@pytest.mark.slow  # two fresh Python processes importing torch + TL: 30–75 s on 2 shared cores
def test_torchrun_two_processes_equal_one(tmp_path):
    """The real thing: ``torchrun --nproc_per_node=2`` (gloo) on the shipped model; JSON equal to one process."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "tl_patching.cli",
        "reproduce",
        "--experiments",
        "e4,e5",
        "--n-prompts",
        "8",
        "--device",
        "cpu",
        "--no-png",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    forward = load_forward("shipped", device="cpu")
    for key in ("e4", "e5"):
        one = json.loads(run_experiment(key, forward, 8, progress=False).to_json())
        assert_same_json(json.loads((out / "shipped" / f"{key}_result.json").read_text()), one)
    rank1 = {p.name: p.read_text() for p in logs.rglob("*") if p.is_file() and p.parent.name == "1"}
    assert rank1, f"no rank-1 logs under {logs}"
    assert not any("it/s" in text or "wrote" in text for text in rank1.values())  # no progress bars, no files


def test_dtypes_load_and_stay_close(tmp_path):
    ref = load_forward("shipped", device="cpu")
    batch = prompts.seed_pair(ref.model)
    clean = logit_diff(ref(batch.tokens), batch.correct, batch.wrong)
    for dtype, tol in (("bfloat16", 0.5), ("float16", 0.1)):  # docs/scaling.md: measured 0.25 / 0.04 nats on E4
        for backend in ("tl", "hf"):
            f = load_forward("shipped", backend, "cpu", dtype)
            assert f.model.cfg.dtype == distributed.DTYPES[dtype] and f.model.W_Q.dtype == distributed.DTYPES[dtype]
            if backend == "hf":
                assert next(f.hf_model.parameters()).dtype == distributed.DTYPES[dtype]
            ld = logit_diff(f(batch.tokens), batch.correct, batch.wrong).float()
            assert (ld - clean).abs().max() <= tol, (dtype, backend)
            # The fast path in that dtype (on a bridge: its HF twin, checked against it with a dtype's tolerance)
            metric = LogitDiff(batch.correct, batch.wrong)
            _, donor = f.run(batch.donor_tokens, cache=[act_name("z", l) for l in range(f.cfg.n_layers)])
            quick = fast.final_position_head_sweep(f, batch.tokens, donor, metric, progress=False)
            driver = patching.head_sweep(f, batch.tokens, donor, metric, pos=-1)
            assert (quick - driver).abs().max() <= tol / 4, (dtype, backend)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_forward("shipped", dtype="float64")


def test_cache_from_another_device_and_dtype_loads_on_cpu(tmp_path):
    """A cache file holds no device: what a GPU run saved loads on a CPU machine. Simulated here with a
    bfloat16 run (what a GPU run typically saves), loaded onto the CPU and onto a second device type (meta)."""
    f = load_forward("shipped", device="cpu", dtype="bfloat16")
    batch = prompts.seed_pair(f.model)
    names = [act_name("z", 0), act_name("resid_post", 1)]
    acts = f.run(batch.donor_tokens, cache=names)[1]
    path = save_cache(tmp_path / "gpu-run.safetensors", acts, f.model, batch.donor_tokens, True)
    header = read_header(path)
    assert "device" not in json.dumps(header) and header["dtype"][names[0]] == "bfloat16"
    back = load_cache(path, f.model, batch.donor_tokens, device="cpu")
    assert all(back[n].device.type == "cpu" and torch.equal(back[n], acts[n]) for n in names)
    assert all(t.device.type == "meta" for t in load_cache(path, device="meta").values())


def test_model_parallel_layout_and_checks():
    cuda = [torch.device("cuda", i) for i in range(3)]

    class Cfg:  # what get_device_for_block_index reads
        device, n_layers, n_devices = "cuda", 8, 3

    assert distributed.block_devices(8, cuda) == [get_device_for_block_index(l, Cfg) for l in range(8)]
    assert distributed.block_devices(2, cuda[:2]) == cuda[:2]
    hf, _ = random_gpt2(n_layers=3)
    device_map = distributed.hf_device_map(3, cuda[:2])
    for name, _ in hf.named_parameters():  # every parameter has exactly one place
        assert sum(name == k or name.startswith(k + ".") for k in device_map) == 1, name
    assert device_map["lm_head"] == device_map["transformer.wte"]  # tied weights stay together
    assert distributed.check_devices("cpu", 1) == [torch.device("cpu")]
    with pytest.raises(ValueError, match="needs CUDA devices"):
        distributed.check_devices("cpu", 2)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"this machine has {available} CUDA device"):
        distributed.check_devices("cuda", available + 1)
    with pytest.raises(ValueError, match="at least 1"):
        distributed.check_devices("cpu", 0)


def test_one_device_placement_runs_the_experiments():
    f = load_forward("shipped", device="cpu", n_devices=1)
    assert f.model.cfg.n_devices == 1 and {p.device.type for p in f.model.parameters()} == {"cpu"}
    assert run_experiment("e5", f, 1, progress=False).effect.shape == (f.cfg.n_layers, f.cfg.n_heads, 1)


@pytest.mark.skipif(lens.MAJOR < 4, reason="HookedTransformer's blocks are placed over devices (TransformerLens 3)")
def test_a_bridge_over_several_devices_is_refused_by_name():
    """TL 4: the bridge runs the HF model's forward, which tl_patching does not split (no GPU here: meta stands in)."""
    _, bridge = random_gpt2(n_layers=2)
    with pytest.raises(NotImplementedError, match="over 2 devices on TransformerLens 4.*one device per process"):
        distributed.place(bridge, [torch.device("cpu"), torch.device("meta")])
    assert distributed.place(bridge, [torch.device("cpu")]) is bridge
