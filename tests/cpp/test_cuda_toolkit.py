"""The build's CUDA toolkit discovery, with the nvcc on PATH a wrapper outside its toolkit."""

import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cuda_toolkit import find_cuda_toolkit  # noqa: E402


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def wrapped_toolkit(tmp_path, monkeypatch):
    toolkit = tmp_path / "opt" / "cuda-99.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    # A stand-in nvcc that answers --dryrun the way the real one does.
    _executable(toolkit / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _HERE_={toolkit}/bin" >&2\necho "#$ _THERE_={toolkit}/bin" >&2\n')
    wrappers = tmp_path / "usr" / "local" / "bin"
    wrappers.mkdir(parents=True)
    _executable(wrappers / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return toolkit


def test_finds_real_toolkit_behind_wrapper(wrapped_toolkit):
    root, how = find_cuda_toolkit()
    assert root == str(wrapped_toolkit)
    assert "--dryrun" in how


def test_cuda_home_wins(wrapped_toolkit, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "elsewhere"))
    assert find_cuda_toolkit()[0] == str(tmp_path / "elsewhere")


def test_no_toolkit_reports_why(wrapped_toolkit):
    (wrapped_toolkit / "include" / "cuda_runtime.h").unlink()
    root, how = find_cuda_toolkit()
    assert root is None and "could not read the toolkit folder" in how
