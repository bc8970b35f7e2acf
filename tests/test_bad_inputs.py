"""Every mistake is caught before any work: bad input through the CLI is one `error: ...` line
on stderr and exit status 2, never a traceback, a silent success or an allocation that dies.

Each case runs `research.cli.main` in-process. Allocating a model's state is patched to fail the
test, so every case must be refused before any parameters exist (and so before any compile).
"""

from __future__ import annotations

import json

import pytest

from research.cli import main
from research.config import ExperimentConfig, ResearchError

TINY = ["tiny", "--set", "log.progress=false"]


def _set(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


# (id, argv with {placeholders} for the paths the `paths` fixture makes, phrase in the message)
CASES = [
    # unknown enum values
    ("attention", ["train", *TINY, *_set("model.attention=flash")], "model.attention='flash'"),
    ("schedule", ["train", *TINY, *_set("optim.schedule=linear")], "cosine, wsd, constant"),
    ("router", ["train", *TINY, *_set("model.router=topk")], "model.router='topk'"),
    ("dispatch", ["train", *TINY, *_set("model.moe_dispatch=sorted")], "capacity, dropless"),
    ("remat", ["info", *TINY, *_set("model.remat=some")], "none, full, save-dots"),
    ("tokenizer", ["prepare", *TINY, *_set("data.tokenizer=wordpiece")], "data.tokenizer"),
    ("param dtype", ["train", *TINY, *_set("model.param_dtype=fp32")], "model.param_dtype"),
    ("compute dtype", ["info", *TINY, *_set("model.compute_dtype=half")], "model.compute_dtype"),
    # non-positive and non-dividing sizes
    ("negative steps", ["train", *TINY, *_set("train.steps=-5")], "train.steps=-5 must be >= 0"),
    ("zero width", ["train", *TINY, *_set("model.d_model=0")], "model.d_model=0 must be positive"),
    ("zero lr", ["train", *TINY, *_set("optim.lr=0")], "optim.lr=0.0 must be positive"),
    ("heads", ["train", *TINY, *_set("model.d_model=30")], "not divisible by model.n_heads"),
    ("kv heads", ["info", *TINY, *_set("model.n_kv_heads=3")], "multiple of model.n_kv_heads=3"),
    ("accum", ["train", *TINY, *_set("optim.grad_accum=3")], "multiple of optim.grad_accum=3"),
    ("keep", ["train", *TINY, *_set("train.keep_checkpoints=0")], "train.keep_checkpoints=0"),
    ("log every", ["train", *TINY, *_set("train.log_every=0")], "train.log_every=0"),
    ("val fraction", ["prepare", *TINY, *_set("data.val_fraction=1.5")], "data.val_fraction"),
    ("top k", ["info", *TINY, *_set("model.n_experts=4", "model.top_k=5")], "model.top_k=5"),
    ("post mode", ["train", *TINY, *_set("post.mode=rlhf")], "post.mode='rlhf' is not one of"),
    ("dpo start", ["train", *TINY, *_set("post.mode=dpo", "post.data=p.jsonl")], "post.init_from"),
    ("sft data", ["train", *TINY, *_set("post.mode=sft", "post.data=no.jsonl")], "no.jsonl does"),
    ("two rest axes", ["train", *TINY, *_set("mesh.fsdp=-1")], "only one mesh axis may be -1"),
    ("mesh zero", ["train", *TINY, *_set("mesh.tensor=0")], "mesh.tensor=0"),
    ("tensor split", ["train", *TINY, *_set("mesh.tensor=3")], "over mesh.tensor=3"),
    ("pue", ["train", *TINY, *_set("energy.pue=0.5")], "energy.pue=0.5 must be >= 1.0"),
    ("several at once", ["train", *TINY, *_set("model.n_layers=0", "optim.b1=1.0")], "2 problems"),
    # keys, values and experiments that do not exist
    ("typo key", ["train", *TINY, *_set("model.n_layer=3")], "Did you mean 'n_layers'"),
    ("bad type", ["train", *TINY, *_set("model.n_layers=two")], "expected a value of type int"),
    ("experiment", ["train", "no_such_experiment"], "No experiment named 'no_such_experiment'"),
    # corpora
    ("empty file", ["train", *TINY, *_set("data.corpus={empty}")], "The corpus is empty"),
    ("not utf-8", ["prepare", *TINY, *_set("data.corpus={latin1}")], "byte offset 9"),
    ("empty folder", ["train", *TINY, *_set("data.corpus={folder}")], "holds no .txt files"),
    ("missing corpus", ["prepare", *TINY, *_set("data.corpus={missing}")], "not found"),
    ("blank corpus", ["prepare", *TINY, *_set("data.corpus={blank}")], "The corpus is empty"),
    ("all dedup", ["prepare", *TINY, *_set("data.corpus={repeats}")], "no training text"),
    (
        "missing source",
        ["prepare", *TINY, *_set("data.sources={missing}", "data.tokenizer=bpe")],
        "does not exist",
    ),
    ("char stream", ["train", *TINY, *_set("data.sources={folder}")], "data.tokenizer=bpe"),
    # memory
    ("memory train", ["train", *TINY, *_set("log.device_memory_gb=0.0001")], "model.remat=full"),
    ("memory info", ["info", *TINY, *_set("log.device_memory_gb=0.0001")], "too much"),
    # run folders
    ("eval missing", ["eval", "{missing}"], "does not exist"),
    ("eval not a run", ["eval", "{folder}"], "is not a run folder"),
    ("eval broken", ["eval", "{broken_run}"], "is not a readable config"),
    ("eval bad config", ["eval", "{invalid_run}"], "train.steps=-1"),
    ("generate missing", ["generate", "{missing}"], "does not exist"),
    ("top p", ["generate", "{folder}", "--top-p", "1.5"], "a fraction in (0, 1]"),
    ("samples", ["generate", "{folder}", "--num-samples", "0"], "--num-samples"),
    ("temperature", ["generate", "{folder}", "--temperature", "-1"], "--temperature"),
    # scaling commands
    ("no sweep", ["sweep", "tiny", "--dry-run"], "defines no sweep() function"),
    ("sweep value", ["sweep", "isoflop_shakespeare", *_set("optim.lr=-1")], "optim.lr=-1.0"),
    ("sweep only", ["sweep", "isoflop_shakespeare", "--only", "nope"], "unknown runs ['nope']"),
    ("fit missing", ["fit", "{missing}"], "no results in"),
    ("fit not json", ["fit", "{bad_results}"], "line 2 is not JSON"),
    ("fit columns", ["fit", "{thin_results}"], "missing ['flops'"),
    ("fit no loss", ["fit", "{unfinished_results}"], "without a final val loss"),
    ("fit bootstrap", ["fit", "{bad_results}", "--bootstrap", "-1"], "--bootstrap"),
    ("fit column", ["fit", "{bad_results}", "--params", "n"], "invalid choice: 'n'"),
    ("forecast bare", ["forecast"], "forecast needs --params"),
    ("hardware", ["forecast", "--params", "1e9", "--tokens", "2e10", "--hardware", "Z9"], "Z9"),
    ("mfu", ["forecast", "--case", "gpt3", "--mfu", "1.5"], "--mfu"),
    ("params", ["forecast", "--params", "-1", "--tokens", "1", "--hardware", "H100"], "params"),
    # the command line itself
    ("no command", [], "the following arguments are required: command"),
    ("unknown flag", ["train", "tiny", "--bogus"], "unrecognized arguments: --bogus"),
    ("bad choice", ["forecast", "--case", "gpt4"], "invalid choice: 'gpt4'"),
]


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """Bad corpora, run folders and results files, each in its own place under tmp_path."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    (tmp_path / "latin1.txt").write_bytes("hello café".encode("latin-1"))
    (tmp_path / "repeats.txt").write_text("the same line\n\n" * 30)  # train repeats validation
    (tmp_path / "folder").mkdir()
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "config.json").write_text('{"model": {"d_model": ')
    invalid = tmp_path / "invalid_run"
    invalid.mkdir()
    config = ExperimentConfig().to_dict()
    config["train"]["steps"] = -1
    (invalid / "config.json").write_text(json.dumps(config))
    row = {"name": "a", "flops": 1e12, "tokens": 1e6, "val_loss": 2.0, "active_params": 1e4}
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    (tmp_path / "thin.jsonl").write_text(json.dumps({"name": "a"}) + "\n")
    (tmp_path / "unfinished.jsonl").write_text(json.dumps({**row, "val_loss": None}) + "\n")
    return {
        "empty": str(tmp_path / "empty.txt"),
        "blank": str(tmp_path / "blank.txt"),
        "latin1": str(tmp_path / "latin1.txt"),
        "repeats": str(tmp_path / "repeats.txt"),
        "folder": str(tmp_path / "folder"),
        "missing": str(tmp_path / "no" / "such" / "thing"),
        "broken_run": str(broken),
        "invalid_run": str(invalid),
        "bad_results": str(tmp_path / "bad.jsonl"),
        "thin_results": str(tmp_path / "thin.jsonl"),
        "unfinished_results": str(tmp_path / "unfinished.jsonl"),
    }


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Fail the test if a case gets as far as allocating a model or running a sweep's runs."""
    import research.run.builder
    import research.scaling.sweep

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached real work (model state or a sweep run)")

    monkeypatch.setattr(research.run.builder, "init_train_state", refuse)
    monkeypatch.setattr(research.run.builder, "_restore_params", refuse)
    monkeypatch.setattr(research.scaling.sweep, "run_sweep", refuse)
    monkeypatch.chdir(tmp_path)  # any runs/ folder a command makes lands here


def test_latin1_fixture_puts_the_bad_byte_where_the_table_says():
    raw = "hello café".encode("latin-1")
    first_bad = next(i for i in range(len(raw)) if raw[i] >= 0x80)  # the only non-ASCII byte
    assert first_bad == 9


@pytest.mark.parametrize("argv, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_an_error_line_and_exit_status_2(argv, phrase, paths, no_work, capsys):
    argv = [arg.format(**paths) for arg in argv]
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, f"exit status {status}; stdout: {out[-500:]} stderr: {err[-500:]}"
    assert err.startswith("error: "), err
    assert phrase in err, err
    assert "Traceback" not in out + err


def test_table_covers_every_command_and_enough_mistakes():
    commands = {argv[0] for _, argv, _ in CASES if argv}
    assert commands >= {"train", "eval", "generate", "info", "sweep", "fit", "forecast", "prepare"}
    assert len(CASES) >= 25


def test_check_fits_says_by_how_much_and_which_knobs_help():
    import jax

    from research.train.memory import MemoryReport, check_fits, device_memory_bytes

    mib = 2**20
    report = MemoryReport(
        params_bytes=100 * mib,
        optimizer_bytes=200 * mib,
        activation_bytes=700 * mib,
        devices=1,
        remat="none",
    )
    check_fits(report, None)  # nothing known about the device: no check
    check_fits(report, 1000 * mib)  # exactly fits
    with pytest.raises(ResearchError) as error:
        check_fits(report, 600 * mib)
    message = str(error.value)
    assert "~1,000.0 MiB per device" in message and "600.0 MiB: 400.0 MiB too much" in message
    for knob in ("model.remat=full", "train.batch_size", "optim.grad_accum", "mesh.fsdp"):
        assert knob in message
    cpu = jax.devices("cpu")[0]
    assert device_memory_bytes(cpu) is None and device_memory_bytes(cpu, 2.0) == 2 * 2**30


def test_the_first_file_that_is_not_utf8_is_named_with_its_offset(tmp_path):
    from research.data.corpus import DataError, read_text

    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("fine text")
    raw = b"ok " + "naïve".encode() + b" then \x80 here"
    bad.write_bytes(raw)
    first_bad = max(n for n in range(len(raw) + 1) if _decodes(raw[:n]))  # longest valid prefix
    with pytest.raises(DataError, match=f"{bad} is not UTF-8 text: byte offset {first_bad} "):
        read_text([good, bad], "\n\n")
    assert first_bad == raw.index(b"\x80")


def _decodes(prefix: bytes) -> bool:
    try:
        prefix.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
