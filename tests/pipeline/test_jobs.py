"""The ready sweeps in jobs/: each validates and plans; the GPT-2 one fails fast where GPT-2 is absent."""

import time
from pathlib import Path

import pytest

from pipeline.cli import main

JOBS = Path(__file__).resolve().parents[2] / "jobs"
LOCAL = sorted(p.name for p in JOBS.glob("*.toml") if p.name != "gpt2_numbers.toml")


@pytest.mark.parametrize("name", LOCAL)
def test_ready_sweeps_plan(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(JOBS / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was written" in out and "items" in out
    assert not any(tmp_path.iterdir())


def test_gpt2_numbers_fails_fast_and_clearly_without_gpt2(capsys, tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("gpt2 is in the local cache here: the sweep would run")
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    assert main(["run", str(JOBS / "gpt2_numbers.toml"), "--out", str(tmp_path / "out")]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert "model = 'gpt2'" in err and "not in the Hugging Face cache" in err
    assert "huggingface-cli download" in err
    assert not (tmp_path / "out").exists()
