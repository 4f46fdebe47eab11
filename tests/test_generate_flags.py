"""`ringllm generate`'s flags that were accepted silently or misreported (issue #23, item 16): each
is one `ringllm: error:` line and exit 1 before anything starts, or a help/usage text that says
what the command does. The runs are in this process (main), on a tiny checkpoint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ringllm.cli import build_parser, main
from tests.conftest import make_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("flags") / "m", num_hidden_layers=2)


def one_error(capsys, *args) -> str:
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "2", *args])
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.startswith("ringllm: error:")]
    assert code == 1 and len(lines) == 1, captured.err
    assert captured.out == "" and "ring:" not in captured.err, "the run started"
    return lines[0]


@pytest.mark.parametrize("prompt", ["", "  \n\t "])
def test_an_empty_or_blank_prompt_is_refused_with_the_chat_template_too(capsys, ckpt, prompt):
    line = one_error(capsys, "--model", str(ckpt), "--prompt", prompt)
    assert "--prompt" in line and "empty" in line, line


def test_a_dram_limit_below_the_smallest_ring_is_refused(capsys, ckpt):
    line = one_error(capsys, "--model", str(ckpt), "--dram-limit", "64KiB")
    assert "--dram-limit 64KiB" in line, line


def test_a_tiny_gpu_mem_is_reported_in_its_own_unit(capsys, ckpt):
    line = one_error(capsys, "--model", str(ckpt), "--gpu-mem", "1KiB")
    assert "--gpu-mem 1.0 KiB is below the minimum working set" in line, line


def test_spec_tokens_without_a_draft_is_refused(capsys, ckpt):
    line = one_error(capsys, "--model", str(ckpt), "--spec-tokens", "5")
    assert "--spec-tokens 5" in line and "--draft" in line, line


def test_an_unknown_option_names_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--no-such-option"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ringllm generate"), err
    assert err.strip().splitlines()[-1] == "ringllm generate: error: unrecognized arguments: --no-such-option", err


def _generate_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["generate"]


def test_help_says_speculative_decoding_samples_too():
    draft = next(a for a in _generate_parser()._actions if "--draft" in a.option_strings)
    assert "greedy only" not in draft.help and "sampling" in draft.help, draft.help


def test_the_readme_synopsis_lists_every_generate_option():
    text = README.read_text()
    synopsis = text[text.index("    ringllm generate ["):text.index("    ringllm --version")]
    options = [max(a.option_strings, key=len) for a in _generate_parser()._actions
               if a.option_strings and a.dest != "help"]
    missing = [o for o in options if not re.search(re.escape(o) + r"\b", synopsis)]
    assert not missing, f"README's generate synopsis lacks {missing}"


def test_resident_engine_sizes_torch_threads_as_the_streaming_engine(capsys, ckpt, tmp_path, monkeypatch):
    """Both engines report the torch threads they computed with; the streaming engine's GPU process
    sizes them to the CPUs this run may use (workers.process_setup.apply_torch_threads)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    threads = {}
    for engine in ("--resident", "--loaders=1"):
        metrics = tmp_path / f"{engine.strip('-').split('=')[0]}.json"
        code = main(["generate", "--device", "cpu", "--max-new-tokens", "2", "--model", str(ckpt), "--prompt", "w9",
                     engine, "--metrics-json", str(metrics)])
        assert code == 0, capsys.readouterr().err
        threads[engine] = json.loads(metrics.read_text()).get("torch_threads")
    assert threads["--loaders=1"] and threads["--resident"] == threads["--loaders=1"], threads
