"""The bnlab console command."""

import subprocess
import sys

import bnlab
from bnlab.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert bnlab.__version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "usage: bnlab" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "bnlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and bnlab.__version__ in out.stdout


def test_kernels_command_reports_the_built_cpu_kernels(capsys):
    import platform
    if platform.system() != "Linux":
        return
    assert main(["kernels", "--build"]) == 0
    out = capsys.readouterr().out
    assert "status: available" in out and "Triton kernels" in out


def test_run_says_what_it_wrote_and_where(tmp_path, capsys):
    from bnlab.cli import main
    assert main(["run", "E15", "--profile", "tiny", "--out", str(tmp_path), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bnlab run: E15 ") and f"wrote {tmp_path / 'E15'}/" in last
    assert (tmp_path / "E15" / "result.json").is_file()
