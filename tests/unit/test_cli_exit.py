"""The `mlflow-datahub` command's exit: it skips the interpreter's teardown, but nothing an exit
owes is lost (exit code, output, atexit handlers), and it waits for threads that are still working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_exit_code_output_and_atexit_handlers_survive_the_quick_exit(tmp_path: Path) -> None:
    marker = tmp_path / "atexit"
    result = _run(f"""
import atexit, logging, sys
import connector.cli as cli
def main():
    atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
    logging.getLogger("t").warning("a log line")
    sys.stdout.write("x" * 200000)  # more than a pipe's buffer, no newline: only a flush writes it
    return 3
cli.main = main
cli.entry()
""")
    assert result.returncode == 3, result.stderr
    assert result.stdout == "x" * 200000
    assert "a log line" in result.stderr
    assert marker.read_text() == "ran"


def test_a_thread_still_working_is_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / "thread"
    result = _run(f"""
import threading, time
import connector.cli as cli
def work():
    time.sleep(0.5)
    open({str(marker)!r}, "w").write("finished")
def main():
    threading.Thread(target=work).start()
    return 0
cli.main = main
cli.entry()
""")
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "finished"


def test_an_error_the_command_did_not_expect_still_shows_its_traceback() -> None:
    result = _run("""
import connector.cli as cli
def main():
    raise RuntimeError("unexpected")
cli.main = main
cli.entry()
""")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: unexpected" in result.stderr
