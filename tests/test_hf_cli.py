"""`research export`, and `research generate` / `research eval` on a Hugging Face folder."""

import json

import numpy as np
import pytest
from flax import nnx

from research.cli import main as cli_main
from research.config import REPO_ROOT
from research.hf import load_hf

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hf"
QUIET = ["--set=log.progress=false", "--set=train.sample_tokens=0", "--set=mesh.data=1"]


@pytest.mark.slow
def test_export_a_trained_run_then_generate_and_eval_from_the_folder(tmp_path, capsys):
    """A run trained for a few steps exports to a folder whose import computes the run's
    logits; generate and eval read that folder like a run directory (fast twin below, on a
    fixture folder; the export itself: test_hf_export.py)."""
    run_dir = tmp_path / "run"
    steps = ["--set=train.steps=4", "--set=train.eval_every=0", "--set=train.checkpoint_every=4"]
    assert cli_main(["train", "tiny", f"--set=train.run_dir={run_dir}", *QUIET, *steps]) == 0
    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    from research.run import build_run, load_run_config

    run = build_run(load_run_config(run_dir), "generate")
    imported = load_hf(out)
    tokens = np.arange(20, dtype=np.int32)[None] % run.config.model.vocab_size
    expected = nnx.merge(run.graphdef, run.state["params"])(tokens)
    np.testing.assert_allclose(imported.model()(tokens), expected, atol=1e-5)
    assert imported.tokenizer.decode(imported.tokenizer.encode("ROMEO:\nO")) == "ROMEO:\nO"

    capsys.readouterr()
    args = ["--prompt", "ROMEO:", "--max-tokens", "8", "--num-samples", "2", "--temperature", "0"]
    assert cli_main(["generate", str(out), *args]) == 0
    samples = capsys.readouterr().out.rstrip("\n").split("\n---\n")
    assert len(samples) == 2 and samples[0].startswith("ROMEO:") and samples[0] == samples[1]

    assert cli_main(["eval", str(out), "--seq-len", "32", "--max-batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["val_bpb"] < 8


@pytest.mark.slow
def test_generate_and_eval_read_a_hf_folder(capsys):
    """(--runslow: two compiles; generation itself is tested in test_generation.py.)"""
    folder = str(FIXTURES / "qwen2")
    args = ["--prompt", "ROMEO:", "--max-tokens", "8", "--num-samples", "2", "--top-k", "5"]
    assert cli_main(["generate", folder, *args]) == 0
    samples = capsys.readouterr().out.rstrip("\n").split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("ROMEO:") for s in samples)
    assert samples[0] != samples[1]  # one seed per sample
    assert cli_main(["eval", folder, "--seq-len", "32", "--max-batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_bpb"] > 0 and result["corpus"] == "tinyshakespeare"


def test_cli_import_error_is_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((FIXTURES / "llama2" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["BertModel"]}))
    assert cli_main(["eval", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: architecture ['BertModel'] is not supported")
