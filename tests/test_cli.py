"""The command line's edges: prompt input, output paths, `top --interval`, --help, --version, a
reader that closes stdout, a Python without numpy. ringllm's own errors are one line
`ringllm: error: ...` and exit 1, found before anything is created; usage errors exit 2."""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringllm.cli import build_parser, main
from tests.conftest import make_hf_checkpoint, make_model_dir, write_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"

# Python started with this on its path cannot import numpy, as in a venv with only `pip install .`
NUMPY_BLOCKER = '''
import sys

class BlockNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockNumpy())
'''


def ringllm(*args, env=None, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "ringllm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("ringllm: error:")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli") / "m", num_hidden_layers=2)


def generate(capsys, *args):
    """`ringllm generate` in this process: (exit code, the error lines, captured)."""
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "4", *args])
    captured = capsys.readouterr()
    return code, error_lines(captured.err), captured


def expect_one_error(capsys, *args, needles=()):
    code, lines, captured = generate(capsys, *args)
    assert code == 1, captured
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert captured.out == "", "the run started"
    return lines[0]


# --- 8: numpy is no dependency ----------------------------------------------------------------------

def test_generate_runs_without_numpy(ckpt, tmp_path):
    """Both engines in a Python that cannot import numpy, against the resident engine with numpy."""
    (tmp_path / "sitecustomize.py").write_text(NUMPY_BLOCKER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    blocked = {**os.environ, "PYTHONPATH": path}
    probe = subprocess.run([sys.executable, "-c", "import numpy"], env=blocked, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, "the numpy blocker is not in effect"
    common = ["generate", "--model", str(ckpt), "--device", "cpu", "--prompt", "w9 w10", "--max-new-tokens", "6"]
    reference = ringllm(*common, "--resident")
    assert reference.returncode == 0, reference.stderr
    for engine in (["--resident"], ["--loaders", "2"]):
        r = ringllm(*common, *engine, env=blocked)
        assert r.returncode == 0, r.stderr
        assert r.stdout == reference.stdout and r.stdout.strip(), (engine, r.stdout, reference.stdout)
        assert "Traceback" not in r.stderr and "numpy" not in r.stderr.lower(), r.stderr


# --- 12: a reader that closes stdout -----------------------------------------------------------------

@pytest.fixture
def long_run_ckpt(tmp_path):
    """A tiny checkpoint whose greedy decode never ends early: the lm_head row of the EOS token
    is zero, so its logit is 0 while the largest of the other 127 random logits is positive."""
    d = tmp_path / "long"
    hf = make_hf_checkpoint(d, num_hidden_layers=2)
    with torch.no_grad():
        hf.lm_head.weight[hf.config.eos_token_id] = 0.0
    hf.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d)
    return d


def test_closed_stdout_ends_quietly_and_cleans_up(long_run_ckpt, tmp_path):
    """`ringllm generate | head -c 8`: no traceback, exit 141 (as if by SIGPIPE), and the autouse
    fixture finds no segment, queue or process of the run left behind."""
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ringllm", "generate", "--model", str(long_run_ckpt),
                                 "--device", "cpu", "--prompt", "w9 w10", "--no-chat", "--max-new-tokens", "200"],
                                stdout=subprocess.PIPE, stderr=err)
        first = os.read(proc.stdout.fileno(), 8)
        proc.stdout.close()
        code = proc.wait(timeout=120)
    stderr = err_file.read_text()
    assert first, stderr
    assert "ring:" in stderr, stderr          # the streaming engine was running when the pipe closed
    for noise in ("Traceback", "BrokenPipe", "Broken pipe", "Exception ignored", "ringllm: error"):
        assert noise not in stderr, stderr
    assert code == 141, (code, stderr)


# --- 13: --metrics-json is checked before the run ----------------------------------------------------

@pytest.mark.parametrize("target,needle", [("missing/metrics.json", "does not exist"),
                                           ("a-directory", "is a directory"),
                                           ("a-file/metrics.json", "is not a directory")])
def test_metrics_json_unwritable_fails_before_the_run(capsys, ckpt, tmp_path, target, needle):
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / target
    expect_one_error(capsys, "--model", str(ckpt), "--prompt", "w9", "--metrics-json", str(path),
                     needles=("--metrics-json", str(path), needle))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_metrics_json_in_read_only_directory_fails_before_the_run(capsys, ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        expect_one_error(capsys, "--model", str(ckpt), "--metrics-json", str(ro / "m.json"),
                         needles=("--metrics-json", "not writable"))
    finally:
        ro.chmod(0o700)


# --- 14: top --interval -------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", ["-1", "0", "0.01", "nan", "inf"])
def test_top_interval_below_the_minimum_is_one_line(capsys, interval):
    code = main(["top", "--interval", interval])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 1 and len(lines) == 1, captured.err
    assert "--interval" in lines[0] and "at least 0.05" in lines[0], lines[0]


# --- 15: prompt input ----------------------------------------------------------------------------------

def test_binary_prompt_file_is_one_line_naming_the_file(capsys, ckpt, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)        # 0x80 at offset 128 is no UTF-8 start byte
    expect_one_error(capsys, "--model", str(ckpt), "--prompt-file", str(junk),
                     needles=(str(junk), "not UTF-8", "offset 128"))


def test_prompt_file_with_nul_bytes_is_binary(capsys, ckpt, tmp_path):
    f = tmp_path / "nul.txt"
    f.write_bytes(b"w9\x00w10")
    expect_one_error(capsys, "--model", str(ckpt), "--prompt-file", str(f), needles=(str(f), "binary", "offset 2"))


def test_prompt_file_dash_reads_stdin(capsys, monkeypatch, ckpt):
    common = ["--model", str(ckpt), "--resident", "--no-chat"]
    code, lines, reference = generate(capsys, *common, "--prompt", "w9 w10 w11")
    assert code == 0 and reference.out.strip(), reference.err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"w9 w10 w11\n")))
    code, lines, captured = generate(capsys, *common, "--prompt-file", "-")
    assert code == 0 and not lines, captured.err
    assert captured.out == reference.out


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_without_chat_fails_before_anything_starts(ckpt, prompt):
    r = ringllm("generate", "--model", str(ckpt), "--device", "cpu", "--prompt", prompt, "--no-chat",
                "--max-new-tokens", "2")
    assert r.returncode == 1, r.stderr
    # the whole of stderr is the error: no ring was created, no process started
    assert r.stderr.strip().splitlines() == error_lines(r.stderr), r.stderr
    assert len(error_lines(r.stderr)) == 1 and "--prompt" in r.stderr and "empty" in r.stderr, r.stderr


# --- 18: smaller command-line gaps ---------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ringllm {importlib.metadata.version('ringllm')}\n"


# options that have nothing to default to: without them nothing is read or written
NOTHING_TO_DEFAULT = {"--prompt-file", "--metrics-json", "--json"}


def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices.items())


@pytest.mark.parametrize("name,parser", subcommands(), ids=[name for name, _ in subcommands()])
def test_help_shows_every_default(monkeypatch, capsys, name, parser):
    monkeypatch.setenv("COLUMNS", "1000")             # one option per line, no wrapping
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"] or action.required:
            continue
        flag = action.option_strings[-1]
        assert action.help, f"ringllm {name} {flag} has no help text"
        default = action.default
        if default is False or default == []:      # flags and repeatable options: off / none
            continue
        if default is None:
            if flag not in NOTHING_TO_DEFAULT:
                assert "default" in action.help, f"ringllm {name} --help: {flag} does not say its default"
            continue
        shown = str(default)
        assert f"default: {shown}" in text or f"default {shown}" in text, \
            f"ringllm {name} --help: {flag} does not show its default {shown}"


def test_model_that_is_a_file_says_so(capsys, ckpt):
    line = expect_one_error(capsys, "--model", str(ckpt / "config.json"),
                            needles=(str(ckpt / "config.json"), "is a file", "model directory is expected"))
    assert "not found" not in line


def test_model_that_looks_like_a_hub_id_says_how_to_download(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    expect_one_error(capsys, "--model", "meta-llama/Llama-3.1-8B-Instruct",
                     needles=("local model directory", "hf download meta-llama/Llama-3.1-8B-Instruct --local-dir"))
    # a path that is no hub id keeps the plain message
    expect_one_error(capsys, "--model", str(tmp_path / "a" / "b"), needles=("model directory not found",))


def test_usage_errors_exit_2_own_errors_one_line_exit_1_as_documented(capsys, ckpt):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--max-new-tokens", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ringllm generate"), err
    assert err.strip().splitlines()[-1] == "ringllm generate: error: argument --max-new-tokens: invalid int value: 'many'"
    expect_one_error(capsys, "--model", str(ckpt), "--top-p", "1.01", needles=("--top-p",))
    readme = " ".join(README.read_text().lower().split())
    assert "usage errors" in readme and "and exit code 2" in readme, "README does not say usage errors exit 2"
