"""The command line as a user meets it: fast help, one-line errors (no traceback), nothing silently changed."""

import subprocess
import sys
import time

import pytest

ENTRY = [sys.executable, "-m", "tl_patching.cli"]


def cli(*args, timeout=300):
    """The real entry point in a subprocess (what a user's shell runs)."""
    return subprocess.run(ENTRY + list(args), capture_output=True, text=True, timeout=timeout)


def in_process(capsys, *args) -> tuple[int, str]:
    """`main` in this process (no interpreter start-up per case): exit status and stderr."""
    from tl_patching.cli import main

    try:
        main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_help_is_fast_and_imports_no_torch():
    start = time.perf_counter()
    out = cli("--help")
    assert out.returncode == 0 and "reproduce" in out.stdout
    assert time.perf_counter() - start < 3.0  # a second or less on an idle machine; torch alone takes several
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tl_patching.cli; print(sorted(m for m in ('torch', 'transformers', "
            "'transformer_lens') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["reproduce", "e1", "e2", "e3", "e4", "e5"])
def test_every_option_has_help_text(command):
    from tl_patching.cli import parser

    sub = parser()._subparsers._group_actions[0].choices[command]
    undocumented = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
    assert undocumented == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["e3", "--head", "99", "--no-png"], "head 99 out of range"),
        (["e2", "--head", "99", "--no-png"], "head 99 out of range"),
        (["e1", "--text", "", "--no-png"], "empty text"),
        (["e2", "--text", "   ", "--no-png"], "empty text"),
        (["e1", "--text", "The cat sat on the mat", "--no-png"], "does not know 'cat', 'sat', 'mat'"),
        (
            ["e1", "--text", " ".join(["Sam and Sally went to the park."] * 8), "--no-png"],
            "longer than the model's context of 48",
        ),
        (["e4", "--donor-cache", "/nonexistent/dir/x.safetensors"], "the folder /nonexistent/dir does not exist"),
        (["e1", "--model", "/nonexistent-model-dir/x"], "no model directory"),
    ],
)
def test_library_errors_are_one_line(args, message, tmp_path, capsys):
    status, err = in_process(capsys, *args, "--out", str(tmp_path))
    assert status == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_numbers_are_refused(value, capsys):
    status, err = in_process(capsys, "e4", "--n-prompts", value)
    assert status == 2 and "must be at least 1" in err and "Traceback" not in err


def test_cuda_without_a_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, err = in_process(capsys, "e1", "--device", "cuda", "--no-png")
    assert status == 1 and "Traceback" not in err and "no CUDA device" in err


def test_real_entry_point_error_and_debug(tmp_path):
    """Through the interpreter a user starts: one line without --debug, the traceback with it."""
    out = cli("e3", "--head", "99", "--no-png", "--out", str(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: head 99 out of range: the model has 4 heads (0..3)"
    out = cli("e3", "--head", "99", "--no-png", "--debug", "--out", str(tmp_path))
    assert out.returncode == 1 and "Traceback" in out.stderr and "IndexError" in out.stderr


def test_backend_hf_runs_an_experiment(tmp_path, capsys):
    status, err = in_process(capsys, "e3", "--backend", "hf", "--no-png", "--out", str(tmp_path))
    assert status == 0, err
    import json

    assert json.loads((tmp_path / "shipped" / "e3_result.json").read_text())["info"]["backend"] == "hf"


def test_reproduce_uses_the_donor_cache(tmp_path, capsys):
    """--donor-cache on reproduce is honoured: the file is written by the first run and read by the second."""
    cache = tmp_path / "donor.safetensors"
    args = [
        "reproduce",
        "--experiments",
        "e4",
        "--n-prompts",
        "1",
        "--donor-cache",
        str(cache),
        "--no-png",
        "--out",
        str(tmp_path),
    ]
    status, err = in_process(capsys, *args)
    assert status == 0 and cache.exists(), err
    stamp = cache.stat().st_mtime_ns
    status, err = in_process(capsys, *args)
    assert status == 0 and cache.stat().st_mtime_ns == stamp, err  # loaded, not rewritten
