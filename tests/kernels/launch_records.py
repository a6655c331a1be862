"""Every Triton kernel launch of the interpreted kernel tests, compiled for Hopper.

The interpreter runs a kernel's Python; it accepts code that the compiler rejects (a
``tl.PropagateNan`` bound to a local variable compiled nowhere, session 10). So the tests
record each launch's specialisation (argument types, constexpr values, ``num_warps`` /
``num_stages``) and a compiled-mode process builds each distinct one for sm_90 with
Triton's own compiler (no GPU is needed).

``python -P tests/kernels/launch_records.py FILE`` compiles the records in FILE (JSON lines)
and exits 1 listing the failures.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

ENV = "METROLINE_KERNEL_LAUNCHES"
#: Hopper (H100/H200): the GPU the kernels are tuned for.
TARGET = ("cuda", 90, 32)
_OPTIONS = ("num_warps", "num_stages")
_TORCH_TYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8e4nv",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}  # fmt: skip

_records: set[str] = set()


def install() -> None:
    """Record every interpreted launch from now on (the interpreted process calls this)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        record = _describe(self.fn, args, kwargs)
        if record is not None:
            _records.add(json.dumps(record, sort_keys=True))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def dump(path: Path) -> None:
    with path.open("a") as out:
        for line in sorted(_records):
            out.write(line + "\n")


def _describe(fn, args, kwargs) -> dict[str, Any] | None:
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            kind = _constexpr(value)
            if kind is None:
                return None
            signature[name] = "constexpr"
            constexprs[name] = kind
        else:
            kind = _type_of(value)
            if kind is None:
                return None
            signature[name] = kind
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature,
            "constexprs": constexprs, "options": options}  # fmt: skip


def _constexpr(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton"):
        return {"tl_dtype": value.name}
    return None


def _type_of(value) -> str | None:
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        dtype = _TORCH_TYPES.get(str(value.dtype).removeprefix("torch."))
        return f"*{dtype}" if dtype else None
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def compile_all(path: Path) -> list[str]:
    """Build every record of ``path`` through Triton's front end and its first two stages
    (TTIR, TTGIR: code generation, type checks, layouts; LLVM and ptxas would add a second
    a kernel); returns one line per failure."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    failures = []
    records = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    for line in sorted(records):
        record = json.loads(line)
        kernel = getattr(importlib.import_module(record["module"]), record["name"])
        constexprs = {
            name: _tl_dtype(tl, spec["tl_dtype"]) if "tl_dtype" in spec else spec["value"]
            for name, spec in record["constexprs"].items()
        }
        source = ASTSource(fn=kernel, signature=record["signature"], constexprs=constexprs)
        try:
            options = backend.parse_options(record["options"])
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            module = source.make_ir(
                target, options, backend.get_codegen_implementation(options),
                backend.get_module_map(), context,
            )  # fmt: skip
            stages: dict = {}
            backend.add_stages(stages, options, source.language)
            metadata: dict = {}
            for stage in ("ttir", "ttgir"):
                module = stages[stage](module, metadata)
        except Exception as error:  # every failure is reported, not just the first
            inner = error
            while inner.__cause__ is not None:  # a device function's error inside the kernel's
                inner = inner.__cause__
            reason = getattr(inner, "error_message", None) or repr(inner)
            failures.append(f"{record['module']}.{record['name']} {constexprs}: {reason}")
    return failures


def _tl_dtype(tl, name: str):
    """A ``tl.dtype`` from its short name (``bf16``, ``fp32``, ``fp8e4nv``)."""
    return tl.dtype(name)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("compile the records in a process without TRITON_INTERPRET")
    found = compile_all(Path(sys.argv[1]))
    sys.stdout.write("\n".join(found) + "\n" if found else "all launches compiled for sm_90\n")
    sys.exit(1 if found else 0)
