import json
import os
import subprocess
import sys

import pytest
import torch

import internvl3_engine as ie
from internvl3_engine import dispatch
from internvl3_engine.dispatch import KernelSet, why_unusable


def _kernels(triton=True, cuda=True):
    return KernelSet(
        "demo_op",
        torch=lambda: "torch",
        triton=(lambda: "triton") if triton else None,
        cuda=(lambda: "cuda") if cuda else None,
    )


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("INTERNVL3_ENGINE_BACKEND", raising=False)
    assert ie.get_backend() == "auto"


def test_context_manager_nests_and_restores():
    with ie.backend("torch"):
        assert ie.get_backend() == "torch"
        with ie.backend("cuda"):
            assert ie.get_backend() == "cuda"
        assert ie.get_backend() == "torch"
    assert ie.get_backend() == "auto"


def test_precedence_context_over_global_over_env(monkeypatch):
    monkeypatch.setenv("INTERNVL3_ENGINE_BACKEND", "triton")
    assert ie.get_backend() == "triton"
    ie.set_backend("cuda")
    try:
        assert ie.get_backend() == "cuda"
        with ie.backend("torch"):
            assert ie.get_backend() == "torch"
    finally:
        ie.set_backend(None)
    assert ie.get_backend() == "triton"


def test_bad_names():
    with pytest.raises(ValueError, match="name must be one of"):
        ie.set_backend("cudnn")
    with pytest.raises(TypeError, match="name must be a str"):
        with ie.backend(3):
            pass


def test_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("INTERNVL3_ENGINE_BACKEND", "fast")
    with pytest.raises(ValueError, match="INTERNVL3_ENGINE_BACKEND must be one of"):
        ie.get_backend()


def test_auto_on_cpu_prefers_compiled_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "why_unusable", lambda kind, device: None)
    assert _kernels().select(torch.device("cpu"))() == "cuda"
    monkeypatch.setattr(dispatch, "why_unusable", lambda kind, device: None if kind == "torch" else "absent")
    assert _kernels().select(torch.device("cpu"))() == "torch"


def test_auto_on_gpu_follows_gpu_order(monkeypatch):
    monkeypatch.setattr(dispatch, "why_unusable", lambda kind, device: None)
    assert _kernels().select(torch.device("cuda"))() == "cuda"
    assert _kernels(cuda=False).select(torch.device("cuda"))() == "triton"


def test_explicit_backend_without_such_kernel_runs_auto_choice(monkeypatch):
    monkeypatch.setattr(dispatch, "why_unusable", lambda kind, device: None)
    with ie.backend("triton"):
        assert _kernels(triton=False).select(torch.device("cpu"))() == "cuda"


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "why_unusable", lambda kind, device: "not built")
    with ie.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run demo_op on cpu tensors: not built"):
        _kernels().select(torch.device("cpu"))


def test_why_unusable_reports_triton_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = dispatch.why_unusable("triton", torch.device("cpu"))
    assert reason is not None
    assert "TRITON_INTERPRET=1" in reason or "not importable" in reason


@pytest.mark.parametrize(
    "triton_version,numpy_version,usable",
    [("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.0", True), ("3.8.1+git", "2.5.0", True),
     ("3.6.0", "3.0.0rc1", False)],
)
def test_triton_interpreter_refused_where_numpy_breaks_it(monkeypatch, triton_version, numpy_version, usable):
    """triton < 3.7's interpreter fails every segment loop under numpy >= 2.4: the 'triton' backend on CPU
    tensors is then unusable, with the reason, instead of failing inside a kernel."""
    import numpy
    import triton

    if dispatch.triton_import_error() is not None:
        pytest.skip("triton is not importable here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    dispatch.triton_interpreter_error.cache_clear()
    try:
        reason = dispatch.why_unusable("triton", torch.device("cpu"))
    finally:
        dispatch.triton_interpreter_error.cache_clear()
    if usable:
        assert reason is None
    else:
        assert f"triton {triton_version} fails with numpy {numpy_version}" in reason and "numpy<2.4" in reason


def test_info_keys():
    result = ie.info()
    for key in ("version", "torch", "triton", "extension_cpu", "extension_cuda", "cuda_archs", "gpu"):
        assert key in result
    assert result["version"] == ie.__version__
    assert isinstance(result["extension_cpu"], bool) and isinstance(result["extension_cuda"], bool)
    if result["extension_cuda"]:
        assert result["cuda_archs"], "a CUDA build names its archs"


def test_info_command():
    printed = subprocess.run([sys.executable, "-m", "internvl3_engine", "info"], capture_output=True, text=True, check=True)
    assert json.loads(printed.stdout)["version"] == ie.__version__


def test_extension_is_built():
    """The test command installs the package with its extension; CI builds the CUDA variant."""
    assert ie.info()["extension_cpu"], ie.info()["extension_error"]
    if os.environ.get("INTERNVL3_ENGINE_BUILD") == "cuda":
        assert ie.info()["extension_cuda"]


def test_backend_choice_reaches_other_threads():
    """The autograd engine runs CUDA backward passes on its own threads: they must see the choice."""
    import threading

    seen = []
    with ie.backend("torch"):
        worker = threading.Thread(target=lambda: seen.append(ie.get_backend()))
        worker.start()
        worker.join()
    assert seen == ["torch"]


def test_demo_runs_every_op_and_checks_it(capsys):
    from internvl3_engine.__main__ import main

    for kind in ["auto"] + [kind for kind in ("triton", "torch") if why_unusable(kind, torch.device("cpu")) is None]:
        assert main(["demo", "--device", "cpu", "--backend", kind]) == 0
        printed = capsys.readouterr().out
        for op in ("v2pe_position_ids", "pixel_unshuffle_layernorm", "scatter_visual", "apply_rotary", "loss_weights"):
            assert op in printed


def test_extension_has_a_function_per_compiled_operator():
    """extension.py names every operator that internvl3_engine._C registers (and nothing else calls one)."""
    from internvl3_engine import extension

    if not extension.extension_available():
        pytest.skip(extension.extension_load_error())
    registered = {schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith("internvl3_engine_C::")}
    assert registered
    assert {name for name in registered if callable(getattr(extension, name, None))} == registered


def test_compiled_kernels_without_the_extension(monkeypatch):
    """Without _C, 'auto' runs the references, 'cuda' says why it cannot run, and the compiled functions raise."""
    from internvl3_engine import extension

    monkeypatch.setattr(extension, "_load", lambda: (None, "ImportError: no _C here"))
    assert why_unusable("cuda", torch.device("cpu")) == "the compiled extension did not load (ImportError: no _C here)"
    from internvl3_engine.ops.rotary.op import ROTARY
    from internvl3_engine.ops.rotary.reference import rotary_inv_freq, rotary_reference

    assert ROTARY.chosen(torch.device("cpu")) == "torch"
    x, positions = torch.randn(4, 2, 8), torch.arange(4.0)
    torch.testing.assert_close(ie.apply_rotary(x, positions), rotary_reference(x, positions, rotary_inv_freq(8, 1e6, x.device)))
    with ie.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run apply_rotary on cpu tensors"):
        ie.apply_rotary(x, positions)
    with pytest.raises(RuntimeError, match="internvl3_engine._C is not available: ImportError: no _C here"):
        extension.rotary(x, positions, torch.ones(4), False)


def test_triton_kernel_modules_are_imported_on_first_use():
    """A Triton module reads TRITON_INTERPRET when imported: importing the package imports none of the engine's
    kernel modules, so the variable set afterwards still counts, and a Triton kernel's first call imports its own."""
    if dispatch.triton_import_error() is not None:
        pytest.skip(dispatch.triton_import_error())
    code = (
        "import json, os, sys, torch, internvl3_engine as ie\n"
        "kernels = lambda: sorted(m for m in sys.modules if m.startswith('internvl3_engine.ops.') and '.triton_' in m)\n"
        "before = kernels()\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "with ie.backend('triton'):\n"
        "    ie.apply_rotary(torch.randn(4, 2, 8), torch.arange(4.0))\n"
        "print(json.dumps([before, kernels()]))\n"
    )
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [[], ["internvl3_engine.ops.rotary.triton_kernel"]]
