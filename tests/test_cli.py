"""The `kiln` command end to end, through subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_model
from kilnlm.runtime.engine import Engine, demo_model_path

KILN = [sys.executable, "-m", "kilnlm.cli"]


def run_kiln(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KILN, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, sp_tokenizer_files) -> Path:
    folder = tmp_path_factory.mktemp("cli_model")
    make_hf_model(folder, "llama", vocab_size=TOKENIZER_VOCAB, max_position_embeddings=256)
    add_tokenizer(folder, sp_tokenizer_files)
    return folder


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "kiln"
    assert script.is_file()
    assert subprocess.run([str(script), "--help"], capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("command", ["generate", "chat", "demo"])
def test_every_command_help_shows_an_example(command):
    result = run_kiln(command, "--help")
    assert result.returncode == 0 and "example:" in result.stdout and f"kiln {command}" in result.stdout


def test_generate_prints_only_the_generated_text(model_folder):
    result = run_kiln("generate", str(model_folder), "-p", "Once upon a time", "--temperature", "0",
                      "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    expected = Engine.load(model_folder, progress=False).generate("Once upon a time", max_tokens=10, temperature=0)
    assert result.stdout == expected + "\n"
    assert "loaded" in result.stderr and "decode" in result.stderr


def test_generate_reports_bad_input_without_a_traceback(tmp_path):
    result = run_kiln("generate", str(tmp_path / "missing"), "-p", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("kiln: error:") and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_generates_and_reports_speed():
    result = run_kiln("demo", "--max-tokens", "40")
    assert result.returncode == 0, result.stderr
    text, _, report = result.stdout.rpartition("[demo]")
    assert len(text.split()) >= 5 and "tokens/s" in report


def test_chat_reset_and_exit_through_stdin(model_folder):
    result = run_kiln("chat", str(model_folder), "--max-tokens", "5", "--temperature", "0",
                      stdin="the cat\nthe dog\n/reset\nthe cat\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    engine = Engine.load(model_folder, progress=False)
    conversation = [{"role": "user", "content": "the cat"}]
    first = engine.chat(conversation, max_tokens=5, temperature=0)
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "the dog"}]
    second = engine.chat(conversation, max_tokens=5, temperature=0)
    # After /reset the same question starts a new conversation and gets the first answer again.
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "(conversation cleared)" in result.stderr
    assert result.stderr.count("cached") == 3


def test_chat_ctrl_c_stops_the_answer_but_not_the_session():
    if not demo_model_path().is_dir():
        pytest.skip("demo model not built")
    # Greedy, so the answer is long and the same on every run. A shell starts background jobs with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child a terminal's default.
    proc = subprocess.Popen([*KILN, "chat", "--max-tokens", "100000", "--ctx", "4096", "--temperature", "0"],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("ROMEO:\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "(answer stopped)" in stderr
