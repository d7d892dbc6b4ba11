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
