"""The command line as a user meets it: fast help, one-line errors (no traceback), nothing silently changed."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENTRY = [sys.executable, "-m", "tl_patching.cli"]
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("model", ["/nonexistent-model-dir/x", "./no-such-dir", "no-such-file.gguf"])
def test_a_model_path_that_does_not_exist_fails_before_torch(model, tmp_path):
    """Like the other argument errors: one line, before torch is imported (it took ~7 s)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom tl_patching.cli import main\ntry:\n    main(['e1', '--model', sys.argv[1], '--out', "
            "sys.argv[2]])\nexcept BaseException as e:\n    print(type(e).__name__, e)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))",
            model,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip().splitlines()[-1] == "[]", probe.stdout + probe.stderr
    assert f"no model directory or file at {model}" in probe.stdout + probe.stderr


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


# --- arguments before torch, --help, the output folder, the log ---


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """An environment in which importing torch fails: what runs there has checked its arguments without it."""
    fake = tmp_path_factory.mktemp("no_torch")
    (fake / "torch").mkdir()
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported before the arguments were checked')")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}


def test_arguments_and_paths_are_checked_before_torch_is_imported(no_torch, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["e1", "--text", ""], "error: --text: empty text: give at least one word"),
        (["e2", "--text", "  "], "error: --text: empty text: give at least one word"),
        (
            ["e3", "--out", str(a_file)],
            f"error: --out: {a_file} is a file, not a folder (results go to {a_file}/shipped)",
        ),
        (["reproduce", "--out", str(a_file / "deeper")], f"error: --out: {a_file} is a file, not a folder"),
        (
            ["e4", "--donor-cache", str(tmp_path / "missing" / "x.safetensors")],
            f"error: --donor-cache {tmp_path}/missing/x.safetensors: the folder {tmp_path}/missing does not exist",
        ),
        (["e5", "--donor-cache", str(tmp_path)], f"error: --donor-cache {tmp_path} is a folder: give a file name"),
        (["reproduce", "--experiments", "e3,e9"], "error: --experiments: unknown experiment(s) e9; choose from e1"),
    ]
    for args, message in cases:
        out = subprocess.run(ENTRY + args, capture_output=True, text=True, env=no_torch, cwd=tmp_path, timeout=60)
        assert out.returncode == 1 and out.stdout == "", (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(message), (args, out.stderr)
    # the control: valid arguments get as far as torch, which this environment refuses
    out = subprocess.run(ENTRY + ["e1", "--no-png"], capture_output=True, text=True, env=no_torch, cwd=tmp_path)
    assert out.stderr == "error: torch imported before the arguments were checked\n"
    assert not (tmp_path / "figures").exists()


def test_help_shows_defaults_and_every_model_form():
    out = cli("reproduce", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for default in ("(default: shipped)", "(default: tl)", "(default: auto)", "(default: float32)", "(default: 100)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text
    for form in ("'shipped'", "'smollm2-135m'", "a hub name", "a local HF-format directory", "a .gguf file"):
        assert form in re.search(r"--model MODEL (.*?) --backend", text).group(1), form
    assert "(default: figures/, a folder that git ignores" in text


def test_model_folders_are_unambiguous(tmp_path, monkeypatch):
    from tl_patching.cli import model_folder

    for d in ("a/model", "b/model"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    a, b = model_folder("a/model"), model_folder(str(tmp_path / "b" / "model"))
    assert re.fullmatch(r"model-[0-9a-f]{8}", a) and re.fullmatch(r"model-[0-9a-f]{8}", b) and a != b
    assert model_folder(str(tmp_path / "a" / "model") + "/") == model_folder("./a/../a/model") == a  # one path
    assert [model_folder(n) for n in ("shipped", "SmolLM2-135M", "gpt2-medium")] == [
        "shipped",
        "smollm2-135m",
        "gpt2-medium",
    ]
    assert re.fullmatch(r"EleutherAI-pythia-160m-[0-9a-f]{8}", model_folder("EleutherAI/pythia-160m"))


def test_a_partial_run_keeps_the_index_of_every_result_and_removes_stale_pngs(tmp_path, capsys):
    """`reproduce --experiments e3` into a folder with other results: the index covers them all; --no-png removes
    the PNGs of E3's figures, including one E3 no longer draws."""
    status, err = in_process(
        capsys, "reproduce", "--experiments", "e1,e4", "--n-prompts", "4", "--no-png", "--out", str(tmp_path)
    )
    assert status == 0, err
    folder = tmp_path / "shipped"
    for stale in ("e3_cosine_similarity.png", "e3_an_old_figure.png", "e3_an_old_figure.html"):
        (folder / stale).write_bytes(b"from an earlier run")
    (folder / "e1_mean_raw_score.png").write_bytes(b"png")  # another experiment's figure: left alone
    (folder / "INCOMPLETE.txt").write_text("left by an interrupted run")
    status, err = in_process(capsys, "reproduce", "--experiments", "e3", "--no-png", "--out", str(tmp_path))
    assert status == 0, err
    assert not any(
        (folder / stale).exists()
        for stale in ("e3_cosine_similarity.png", "e3_an_old_figure.png", "e3_an_old_figure.html")
    )
    assert (folder / "e1_mean_raw_score.png").exists() and (folder / "e3_cosine_similarity.html").exists()
    assert not (folder / "INCOMPLETE.txt").exists()  # the folder and its index agree again
    page = (folder / "index.html").read_text()
    for key in ("e1", "e3", "e4"):
        assert f'href="{key}_result.json"' in page, key
    assert '<img src="e1_mean_raw_score.png"' in page and "e3_cosine_similarity.png" not in page
    assert "Not in this folder: e2, e5, circuit, edges" in page and "Incomplete." not in page
    assert err.splitlines()[-1] == f"wrote {folder}/index.html and the results of e3 beside it"


def test_progress_bars_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    status, err = in_process(capsys, "e5", "--n-prompts", "4", "--no-png", "--out", str(tmp_path))
    assert status == 0 and "\r" not in err and "head sweep" not in err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    from tl_patching.cli import main

    main(["e5", "--n-prompts", "4", "--no-png", "--out", str(tmp_path)])
    assert "\rfinal-position head sweep:" in terminal.getvalue()  # the control: a terminal gets its bars
    assert re.fullmatch(r"e5 \(\d+\.\d s\): clean logit diff [^\n]*\n", capsys.readouterr().out)


def test_a_donor_cache_that_does_not_fit_is_one_line_in_cli_words(tmp_path, capsys):
    cache = str(tmp_path / "donor.safetensors")
    status, err = in_process(
        capsys, "e5", "--n-prompts", "4", "--no-png", "--donor-cache", cache, "--out", str(tmp_path)
    )
    assert status == 0, err
    status, err = in_process(
        capsys,
        "e5",
        "--n-prompts",
        "4",
        "--no-png",
        "--donor-cache",
        cache,
        "--dtype",
        "bfloat16",
        "--out",
        str(tmp_path),
    )
    last = err.strip().splitlines()[-1]
    assert status == 1 and "Traceback" not in err
    assert last.startswith(f"error: --donor-cache does not fit: {cache} was made with another model: weights_sha256:")
    assert last.endswith("(delete the file, or give another name, to compute the donor run again)")
    assert len(err.strip().splitlines()) == 2  # "loaded …", then the error: nothing was written, nothing to mark
    # the same mismatch after E1 was written: the folder is marked incomplete, the error is still the last line
    status, err = in_process(
        capsys,
        "reproduce",
        "--experiments",
        "e1,e4",
        "--n-prompts",
        "4",
        "--no-png",
        "--donor-cache",
        cache,
        "--dtype",
        "bfloat16",
        "--out",
        str(tmp_path),
    )
    folder = tmp_path / "shipped"
    lines = err.strip().splitlines()
    assert status == 1 and lines[-1].startswith("error: --donor-cache does not fit: ")
    assert lines[-2] == f"stopped by an error: {folder} is incomplete (INCOMPLETE.txt says what was written)"
    note = (folder / "INCOMPLETE.txt").read_text()
    assert "stopped before it finished (error: --donor-cache does not fit:" in note
    assert "Written by it: e1; not written: e4" in note and "<b>Incomplete.</b>" in (folder / "index.html").read_text()
