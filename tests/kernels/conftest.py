"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.language`` is first imported: the
``@triton.jit`` decorator (Triton's own library functions included) picks interpreter or
compiler when the module is imported. Run alone, this directory sets it here in time. In one
process with the whole suite, earlier tests (the engine's) have usually imported the kernels
already, compiled-mode; then the kernel tests are collected as one item that reruns this
directory in a child process with the variable set, so they still run, and fail loudly. The
child starts when collection ends and runs beside the rest of the suite (it is one
single-threaded interpreter); its item waits for it and reports its outcome, then compiles
every launch the child recorded for sm_90 (``launch_records.py``: the interpreter accepts
code that the compiler rejects).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from . import launch_records

os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).resolve().parent
_CHILD_FLAG = "METROLINE_KERNEL_TESTS_CHILD"


def interpreting() -> bool:
    """True when this process's Triton was imported in interpreter mode."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _fix_interpreter_bf16() -> None:
    """Make the interpreter's bf16 match the GPU's. Triton 3.9's interpreter keeps bf16 as raw
    uint16 and (a) feeds those integers to ``tl.dot`` unconverted and (b) truncates fp32 to
    bf16 where the GPU rounds to nearest even. Both are test-harness bugs, not kernel bugs."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def as_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    original_dot, original_cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        prod = np.matmul(as_f32(a), as_f32(b), dtype=d.data.dtype)
        return TensorHandle(prod + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    InterpreterBuilder.create_dot = create_dot
    InterpreterBuilder.cast_impl = cast_impl


def _fix_interpreter_fp8() -> None:
    """Make the interpreter's e4m3 conversions match the GPU's. Triton 3.9's interpreter rounds
    to e4m3 half-up, loses the carry into the exponent and decodes the NaN code as 480; the GPU
    converts with ``cvt.rn.satfinite`` (round to nearest even, out-of-range to +-448, which is
    torch's rounding on in-range values) and keeps NaN. Both directions go through torch here."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, _get_np_dtype

    as_torch = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
    original = InterpreterBuilder.create_fp_to_fp

    def to_torch(handle, dtype):  # the handle's numpy storage, reinterpreted as ``dtype``
        flat = np.ascontiguousarray(handle.data).reshape(-1).view(np.uint8)
        return torch.from_numpy(flat.copy()).view(dtype).reshape(np.shape(handle.data))

    def to_numpy(t, dst_type):
        flat = t.reshape(-1).contiguous().view(torch.uint8).numpy()
        return flat.view(_get_np_dtype(dst_type)).reshape(tuple(t.shape))

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.float8e4nv and src_ty in as_torch:
            wide = to_torch(src, as_torch[src_ty]).float()
            fp8 = wide.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            return TensorHandle(to_numpy(fp8, dst_type), dst_ty)
        if src_ty == tl.float8e4nv and dst_ty in as_torch:
            wide = to_torch(src, torch.float8_e4m3fn).to(as_torch[dst_ty])
            return TensorHandle(to_numpy(wide, dst_type), dst_ty)
        return original(self, src, dst_type, rounding_mode)

    InterpreterBuilder.create_fp_to_fp = create_fp_to_fp


if interpreting():
    _fix_interpreter_bf16()
    _fix_interpreter_fp8()
    if os.environ.get(launch_records.ENV):
        launch_records.install()


class _ChildRun(pytest.Item):
    """This directory's tests in a fresh interpreter-mode process, started by :meth:`start`."""

    def __init__(self, *, nodeids: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nodeids = nodeids
        self._proc: subprocess.Popen | None = None
        self._output = None

    def start(self) -> None:
        self._launches = Path(tempfile.mkdtemp(prefix="kernel-launches-")) / "launches.jsonl"
        env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
        env[launch_records.ENV] = str(self._launches)
        cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.nodeids]
        self._output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by runtest)
        self._proc = subprocess.Popen(
            cmd, cwd=self.config.rootpath, env=env, stdout=self._output,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Ends a child the session no longer waits for (an interrupted or failed run)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def runtest(self) -> None:
        if self._proc is None:
            self.start()
        returncode = self._proc.wait()
        self._output.seek(0)
        output = self._output.read()
        self._output.close()
        if returncode != 0:
            raise AssertionError(f"kernel tests failed in the child process:\n{output}")
        # Every launch those tests made, through the compiler for sm_90 (launch_records.py).
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        built = subprocess.run(
            [sys.executable, "-P", str(HERE / "launch_records.py"), str(self._launches)],
            cwd=self.config.rootpath, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        shutil.rmtree(self._launches.parent, ignore_errors=True)
        if built.returncode != 0:
            raise AssertionError(f"kernels that do not compile for sm_90:\n{built.stdout}")

    def reportinfo(self):
        return self.path, None, "kernel tests (interpreter, child process)"


_children: list[_ChildRun] = []


def pytest_collection_modifyitems(session, config, items) -> None:
    if interpreting() or os.environ.get(_CHILD_FLAG):
        return
    mine = [item for item in items if HERE in Path(item.path).resolve().parents]
    if not mine:
        return
    nodeids = [item.nodeid for item in mine]
    child = _ChildRun.from_parent(mine[0].parent, name="interpreted_kernel_tests", nodeids=nodeids)
    items[:] = [item for item in items if item not in mine] + [child]
    _children.append(child)


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    for child in _children:
        if child in session.items:
            child.start()


def pytest_sessionfinish(session) -> None:
    for child in _children:
        child.stop()
    if interpreting() and os.environ.get(launch_records.ENV):
        launch_records.dump(Path(os.environ[launch_records.ENV]))


@pytest.fixture(autouse=True)
def poison_new_tensors(monkeypatch):
    """Every float tensor a launcher allocates with ``torch.empty`` starts as NaN, so an output
    element the kernel fails to write fails the comparison."""
    import torch

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
