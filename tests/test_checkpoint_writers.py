"""`ringllm make-checkpoint --out X` refuses what `convert` refuses (a non-empty X, a file) in one
line and leaves X as it was; an X it cannot create is one line too, never a traceback (issue #23,
item 15)."""
from __future__ import annotations

import pytest

from ringllm.cli import main
from tests.conftest import make_model_dir


def one_error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("ringllm: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def make(out) -> list[str]:
    return ["make-checkpoint", "--shape", "tiny", "--layers", "1", "--out", str(out)]


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_make_checkpoint_refuses_an_existing_model_and_keeps_it(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", num_hidden_layers=1)
    before = snapshot(model)
    line = one_error_line(capsys, make(model))
    assert f"{model}: exists and is not empty" in line, line
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]        # no partial directory left


@pytest.mark.parametrize("where,needle", [("a-file", "exists and is a file"),
                                          ("/proc/ringllm-x", "/proc/ringllm-x")])
def test_make_checkpoint_names_a_destination_it_cannot_write(tmp_path, capsys, where, needle):
    out = tmp_path / where
    if where == "a-file":
        out.write_text("keep me")
    line = one_error_line(capsys, make(out))
    assert needle in line, line
    if where == "a-file":
        assert out.read_text() == "keep me"


def test_make_checkpoint_into_a_new_or_empty_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert main(make(out)) == 0, capsys.readouterr().err
        assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


@pytest.mark.parametrize("cache", ["a-file", "/proc/ringllm-cache"])
def test_a_model_cache_that_cannot_be_used_is_one_line(tmp_path, capsys, monkeypatch, cache):
    """RINGLLM_CACHE naming a file, or a place no directory can be made: `generate` without --model
    (the demo model) says so in one line naming the variable, before importing anything."""
    path = tmp_path / cache
    if cache == "a-file":
        path.write_text("not a directory")
    monkeypatch.setenv("RINGLLM_CACHE", str(path))
    line = one_error_line(capsys, ["generate", "--device", "cpu", "--max-new-tokens", "2"])
    assert str(path) in line and "RINGLLM_CACHE" in line, line
