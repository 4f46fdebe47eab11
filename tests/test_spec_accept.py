"""tools/spec_accept on a tiny model: its table against the metrics of `ringllm generate` runs
made here, independently of the tool; an output that differs from the no-draft run is a failure."""
from __future__ import annotations

import json

import pytest

from tests.conftest import make_model_dir
from ringllm.cli import main as ringllm_main
from ringllm.tools import spec_accept as sa

PROMPTS = ("copy", "days")
SPEC_TOKENS = (2, 5)
NEW_TOKENS = 12


def generate(capsys, model, prompt, metrics, *draft):
    """`ringllm generate` as a user runs it with the tool's settings: (stdout, metrics)."""
    capsys.readouterr()
    rc = ringllm_main(["generate", "--model", str(model), "--resident", "--device", "cpu", "--dtype", "float32",
                       "--max-new-tokens", str(NEW_TOKENS), "--prompt", prompt, "--metrics-json", str(metrics), *draft])
    assert rc == 0
    return capsys.readouterr().out, json.loads(metrics.read_text())


def table_rows(text: str, title: str) -> dict:
    """{(draft, K): [cells...]} of one table in spec-accept.txt (the lines under `title`)."""
    block = text.split(title, 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return {(line[:16].strip(), int(line[16:19])): line[19:].split() for line in block}


@pytest.fixture
def tiny(tmp_path):
    # seed 3: both drafts get some tree nodes accepted and rejected, so the cells differ per run
    return make_model_dir(tmp_path / "tiny", num_hidden_layers=3, seed=3)


def test_table_equals_the_runs_metrics(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    rc = sa.main(["--model", str(tiny), "--out", str(out), "--drafts", "ngram,1/3", "--prompts", ",".join(PROMPTS),
                  "--spec-tokens", ",".join(map(str, SPEC_TOKENS)), "--max-new-tokens", str(NEW_TOKENS),
                  "--pass-seconds", "2.5"])
    assert rc == 0
    text = (out / "spec-accept.txt").read_text()
    report = json.loads((out / "spec-accept.json").read_text())
    assert [d["name"] for d in report["drafts"]] == ["ngram", "layers 1/3"]
    assert "first 1 of 3 decoder layers" in report["drafts"][1]["pair"]
    tpp = table_rows(text, "tokens per decode pass:")
    acc = table_rows(text, "acceptance (accepted / drafted tree nodes):")
    assert len(tpp) == len(acc) == 2 * len(SPEC_TOKENS)

    prompts = dict(sa.PROMPTS)
    drafts = {"ngram": ["--draft", "ngram"], "layers 1/3": ["--draft-model", str(out / "drafts" / "layers-1")]}
    for name, draft in drafts.items():
        for k in SPEC_TOKENS:
            per_pass, acceptance, same = [], [], 0
            for p in PROMPTS:
                ref, _ = generate(capsys, tiny, prompts[p], tmp_path / "ref.json")
                got, metrics = generate(capsys, tiny, prompts[p], tmp_path / "m.json", *draft, "--spec-tokens", str(k))
                spec = metrics["speculation"]
                per_pass.append(spec["tokens_per_pass"])
                acceptance.append(spec["acceptance"] or 0.0)
                same += got == ref
            cells = tpp[(name, k)]
            where = f"{name} K={k}: table {cells}, runs {per_pass} {acceptance}"
            assert cells[:len(PROMPTS)] == [f"{v:.2f}" for v in per_pass], where
            assert cells[len(PROMPTS)] == f"{sum(per_pass) / len(per_pass):.2f}", where
            assert cells[len(PROMPTS) + 1] == f"{same}/{len(PROMPTS)}", where
            assert cells[len(PROMPTS) + 2] == f"{sum(per_pass) / len(per_pass) / 2.5:.2f}", where
            mean_acceptance = sum(acceptance) / len(acceptance)
            assert acc[(name, k)] == [f"{v:.0%}" for v in acceptance] + [f"{mean_acceptance:.0%}"], where
    assert report["failures"] == 0


def test_an_output_that_differs_is_a_failure(tmp_path, tiny, monkeypatch, capsys):
    real = sa.run_generate

    def one_run_differs(model, prompt, new_tokens, draft_args, metrics):
        text, m = real(model, prompt, new_tokens, draft_args, metrics)
        if draft_args and draft_args[-1] == "5" and prompt == dict(sa.PROMPTS)["days"]:
            text += "x"
        return text, m
    monkeypatch.setattr(sa, "run_generate", one_run_differs)
    out = tmp_path / "out"
    rc = sa.main(["--model", str(tiny), "--out", str(out), "--drafts", "ngram", "--prompts", ",".join(PROMPTS),
                  "--spec-tokens", ",".join(map(str, SPEC_TOKENS)), "--max-new-tokens", str(NEW_TOKENS)])
    assert rc == 1
    text = (out / "spec-accept.txt").read_text()
    assert "FAILURES: 1 runs' output differs" in text and "days ngram K=5" in text
    tpp = table_rows(text, "tokens per decode pass:")
    assert tpp[("ngram", 5)][-1] == "1/2" and tpp[("ngram", 2)][-1] == "2/2"
    assert "output differs from the no-draft output" in capsys.readouterr().err


def test_jobs_join_the_parts_in_prompt_order(tmp_path, tiny):
    """--jobs 2 (two processes, prompts dealt between them) gives the table one process gives."""
    args = ["--model", str(tiny), "--drafts", "ngram", "--prompts", "copy,days,poem", "--spec-tokens", "3",
            "--max-new-tokens", "8"]
    assert sa.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert sa.main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = ((tmp_path / d / "spec-accept.txt").read_text() for d in ("one", "two"))
    assert two == one
    assert [r["prompt"] for r in json.loads((tmp_path / "two" / "spec-accept.json").read_text())["runs"]] == \
        ["copy", "days", "poem"]


@pytest.mark.parametrize("drafts,needle", [("bogus", "--drafts bogus"), ("3", "--drafts 3: 3 layers"),
                                           ("ngram,1/1", "--drafts 1/1: 3 layers")])
def test_bad_drafts_one_line_exit_1_nothing_created(tmp_path, tiny, capsys, drafts, needle):
    rc = sa.main(["--model", str(tiny), "--out", str(tmp_path / "out"), "--drafts", drafts])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("ringllm: error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()
