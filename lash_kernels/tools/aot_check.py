"""Static GPU check: compile every Triton kernel ahead of time for the GPUs LASH's users have.

Triton ships its own ``ptxas``, so a machine without a GPU can still build the real cubin of a
kernel for any NVIDIA arch and read what the hardware would have to give it: shared memory per
block, registers per thread, spilled bytes, tensor-core (``mma``) instructions. A config over the
arch's shared memory compiles fine and fails only at launch, after its compile time is paid; a
config that spills runs at a fraction of its speed. Neither shows under the interpreter.

Each op's Triton module (:data:`OPS`, imported by name: no op imports this one) declares its
kernels through ``static_variants(shape, dtype, arch)``: one :class:`~lash_kernels.aot_types.KernelVariant`
per launch config the launcher (or its autotuner, after pruning) would use on that arch, built
from the same config source as the launcher, so the two cannot drift. This module compiles them
all and checks four rules per (kernel, dtype, shape, arch) group:

* ``compile``: every variant compiles;
* ``fit``: every variant fits the arch's shared memory per block — what an op declares is what
  its launcher or pruned autotuner would try there, and a config over the limit fails at launch;
* ``spill``: for bf16/fp16 on sm_80 and newer, at least one fitting variant spills no registers;
* ``occupancy``: a memory-bound kernel (one that declares its bytes in flight) on sm_80 and newer,
  at a launch that moves at least 64 KB per SM and whose rows fit its registers (hidden ≤ 8192),
  loads 128 bits at a time (``ld.global.v4`` or 16-byte ``cp.async`` in its PTX) and keeps enough
  loads in flight per SM (:data:`IN_FLIGHT`) through enough resident programs: 4, or 2 when a
  software pipeline (``num_stages`` ≥ 2) overlaps each program's own loads and maths. The
  in-flight targets follow Little's law, bandwidth × latency per SM, with room to spare: about
  25 KB keeps an H200 (4.8 TB/s, 132 SMs) busy and 11 KB an A100; an L4 (300 GB/s, 58 SMs, 100 KB
  of shared memory per SM) needs 3 KB. A launch smaller than that (one wave, every read of an
  SM issued at once) is held to what it reads per SM.

Violations that are known and explained live in an allow-list (``--allow FILE``), one per line::

    kernel dtype shape arch rule  # reason

with ``*`` matching any field; an allow-list line that matches no violation is itself an error, so
the list only shrinks. Compiled results are cached by source hash under ``LASH_AOT_CACHE``
(default ``~/.cache/lash/aot``); a cold run of the full matrix takes minutes, a warm one seconds.

    python -m lash_kernels.aot_check                     # the representative subset (CI)
    python -m lash_kernels.aot_check --full --table      # every arch × dtype × shape, per-variant table
    python -m lash_kernels.aot_check --markdown FILE     # the README's per-arch summary

Run it without ``TRITON_INTERPRET=1``: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lash_kernels._launch import resident_programs
from lash_kernels.aot_types import ARCHS, KernelVariant, StaticShape
from lash_kernels.tools.aot_args import Parser, arch_list, name_list, output_file
from lash_kernels.dispatch import interpreting

# The ops' Triton modules, each declaring ``static_variants``.
OPS = ("lash_kernels.ops.rms_norm.kernels", "lash_kernels.ops.rotary.kernels", "lash_kernels.ops.swiglu.kernels",
       "lash_kernels.ops.multi_exit_ce.kernels")


SHAPES = {
    "seed": StaticShape("seed", tokens=64 * 32, hidden=64, vocab=16384, exits=4, batch=64, seq=32, heads=4, head_dim=16),
    "mid": StaticShape("mid", tokens=4096, hidden=256, vocab=32000, exits=4, batch=16, seq=256, heads=4, head_dim=64),
    "llm": StaticShape("llm", tokens=8192, hidden=2048, vocab=32000, exits=3, batch=4, seq=2048, heads=32, head_dim=64),
    "llm-wide": StaticShape(
        "llm-wide", tokens=8192, hidden=4096, vocab=128256, exits=3, batch=4, seq=2048, heads=32, head_dim=128
    ),
    # The GPU suite's norm and RoPE rows (16384 × 1024, 8 × 32 × 2048 × 128) and its loss at D 1024.
    "bench": StaticShape(
        "bench", tokens=16384, hidden=1024, vocab=65536, exits=4, batch=8, seq=2048, heads=32, head_dim=128
    ),
    # The edge of the envelope: RMSNorm's widest row, RoPE's widest head, a Gemma-sized vocabulary.
    "max": StaticShape(
        "max", tokens=16384, hidden=16384, vocab=262144, exits=2, batch=1, seq=16384, heads=64, head_dim=256
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_PROGRAMS_PER_SM = 4  # 2 for software-pipelined kernels (see the module docstring)
IN_FLIGHT = {80: 64 * 1024, 89: 32 * 1024, 90: 64 * 1024}  # bytes of loads in flight per SM, by arch
ROW_IN_REGISTERS = 8192  # widest row the occupancy rule holds a kernel to
_WIDE_LOAD = re.compile(r"ld\.global[\w:.]*\.v4\.|cp\.async\.(ca|cg)\.shared\.global[^;]*,\s*(16|0x10)\s*[,;]")
# CI's subset: the default model's width, the widest fully fused loss (D 256) and an LLM width; the
# Trainer's fp32 default beside bf16; every arch.
SUBSET = dict(shapes=("seed", "mid", "llm"), dtypes=("fp32", "bf16"), archs=tuple(ARCHS))
FULL = dict(shapes=tuple(SHAPES), dtypes=tuple(DTYPES), archs=tuple(ARCHS))


@dataclasses.dataclass(frozen=True)
class Result:
    """What the compiler says about one variant on one arch."""

    kernel: str
    dtype: str
    shape: str
    arch: int
    config: str  # the constexprs, warps and stages that tell variants apart
    programs: int
    error: str | None = None
    shared: int = 0  # bytes per block
    regs: int = 0  # per thread
    spill_bytes: int = 0  # stack bytes per thread: spilled registers
    mma: bool = False  # tensor-core instructions in the PTX
    blocks_per_sm: int = 0
    wide_loads: bool = False  # 128-bit global loads (or 16-byte cp.async) in the PTX
    bytes_in_flight: int = 0  # per program, as the op declares it (0: not memory-bound)
    bytes_moved: int = 0  # by the whole launch
    stages: int = 1  # the launch's num_stages: ≥ 2 software-pipelines its loops

    @property
    def resident(self) -> int:
        """Programs per SM at once: what the resources allow, and the grid supplies."""
        return min(self.blocks_per_sm, -(-self.programs // ARCHS[self.arch].sms))

    @property
    def in_flight_per_sm(self) -> int:
        return self.resident * self.bytes_in_flight

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= ARCHS[self.arch].smem_per_block

    @property
    def waves(self) -> float:
        """Programs over what the whole GPU runs at once: under 1 leaves SMs idle."""
        slots = ARCHS[self.arch].sms * max(self.blocks_per_sm, 1)
        return self.programs / slots


def _config_label(v: KernelVariant) -> str:
    consts = ",".join(f"{k}={val}" for k, val in v.constexprs.items() if k.startswith("BLOCK"))
    return f"{consts} w{v.num_warps} s{v.num_stages}"


def _attrs(v: KernelVariant) -> dict:
    """Divisibility hints as Triton's launcher would give them: torch's allocations are 16-byte
    aligned, and integer arguments known to be multiples of 16 say so."""
    names = v.fn.arg_names
    aligned = [n for n, ty in v.signature.items() if ty.startswith("*")]
    aligned += [n for n, val in v.int_values.items() if val % 16 == 0]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the cubin Triton built, read back with
    the ``cuobjdump`` it ships. Triton kernels keep nothing on the stack but spilled registers,
    so a stack frame is the spill. Reading the real cubin matters: each Triton release calls
    its own ``ptxas`` with its own flags (3.8 and later add ``--regAllocOptLevel=2``), and a
    kernel that fits on one release may spill on another."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    usage = [(int(regs), int(stack)) for regs, stack in _RES_USAGE.findall(out)]
    return max(r for r, _ in usage), max(s for _, s in usage)


def _cache_dir() -> Path:
    return Path(os.environ.get("LASH_AOT_CACHE", Path.home() / ".cache" / "lash" / "aot"))


def compile_variant(v: KernelVariant, dtype: str, shape: str, arch: int) -> Result:
    """Compile ``v`` for ``arch`` (or read the cached result) and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=_attrs(v))
    base = dict(kernel=v.kernel, dtype=dtype, shape=shape, arch=arch, config=_config_label(v), programs=v.programs,
                bytes_in_flight=v.bytes_in_flight, bytes_moved=v.bytes_moved, stages=v.num_stages)  # fmt: skip
    key = hashlib.sha256(
        f"cubin2-{triton.__version__}-{src.hash()}-{arch}-{v.num_warps}-{v.num_stages}".encode()
    ).hexdigest()
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return Result(**{**json.loads(cached.read_text()), **base})
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
        )
        regs, spills = _cubin_usage(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - any compiler failure is the finding itself
        first = str(exc).strip().splitlines()
        return Result(**base, error=f"{type(exc).__name__}: {first[0] if first else ''}"[:300])
    shared = compiled.metadata.shared
    measured = dict(
        shared=shared,
        regs=regs,
        spill_bytes=spills,
        mma="mma" in compiled.asm["ptx"],
        blocks_per_sm=resident_programs(ARCHS[arch], v.num_warps, shared, regs),
        wide_loads=bool(_WIDE_LOAD.search(compiled.asm["ptx"])),
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(measured))
    tmp.replace(cached)
    return Result(**base, **measured)


def load_ops(extra: Sequence[Path] = ()) -> list:
    """The op modules to check: LASH's own, plus ``extra`` Python files (used to plant a bad kernel)."""
    modules = [importlib.import_module(name) for name in OPS]
    for path in extra:
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def collect(modules: Iterable, shapes: Sequence[str], dtypes: Sequence[str], archs: Sequence[int]) -> list[tuple]:
    """Every (variant, dtype, shape, arch) the ops declare, deduplicated by what gets compiled."""
    jobs, seen = [], set()
    for module in modules:
        for arch in archs:
            for shape in shapes:
                for dtype in dtypes:
                    for v in module.static_variants(SHAPES[shape], DTYPES[dtype], arch):
                        key = (v.kernel, dtype, shape, arch, _config_label(v), v.programs)
                        if key not in seen:
                            seen.add(key)
                            jobs.append((v, dtype, shape, arch))
    return jobs


_JOBS: list[tuple] = []  # what forked workers compile, by index: JIT functions do not pickle


def run(jobs: list[tuple], workers: int) -> list[Result]:
    """Compile all jobs, ``workers`` forked processes at a time (ptxas is single-threaded)."""
    if workers <= 1:
        return [compile_variant(*job) for job in jobs]
    _JOBS[:] = jobs
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile_job, range(len(jobs)), chunksize=1))


def _compile_job(index: int) -> Result:
    return compile_variant(*_JOBS[index])


@dataclasses.dataclass(frozen=True)
class Violation:
    kernel: str
    dtype: str
    shape: str
    arch: int
    rule: str  # "compile", "fit", "spill" or "occupancy"
    detail: str

    def fields(self) -> tuple[str, ...]:
        return self.kernel, self.dtype, self.shape, f"sm_{self.arch}", self.rule


def violations(results: Sequence[Result]) -> list[Violation]:
    """The three rules of the module docstring, one violation per group and rule."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.kernel, r.dtype, r.shape, r.arch)].append(r)
    found = []
    for (kernel, dtype, shape, arch), group in sorted(groups.items()):
        where = (kernel, dtype, shape, arch)
        for r in group:
            if r.error:
                found.append(Violation(*where, "compile", f"{r.config}: {r.error}"))
        fitting = [r for r in group if r.fits]
        over = [r for r in group if not r.error and not r.fits]
        if over:
            worst = max(over, key=lambda r: r.shared)
            limit = ARCHS[arch].smem_per_block
            found.append(Violation(*where, "fit", f"{len(over)} of {len(group)} configs over the limit "
                                   f"({'none fits' if not fitting else 'a launch would fail'}); {worst.config} "
                                   f"needs {worst.shared // 1024} KiB shared memory > {limit // 1024} KiB"))  # fmt: skip
        if dtype != "fp32" and arch >= 80 and fitting and all(r.spill_bytes for r in fitting):
            least = min(fitting, key=lambda r: r.spill_bytes)
            found.append(Violation(*where, "spill", f"every fitting config spills; least: {least.config} "
                                   f"{least.spill_bytes} B/thread"))  # fmt: skip
        for r in fitting:
            short = _occupancy_shortfall(r)
            if short:
                found.append(Violation(*where, "occupancy", f"{r.config}: {short}"))
    return found


def _occupancy_shortfall(r: Result) -> str:
    """What keeps a memory-bound variant from its bandwidth (the ``occupancy`` rule), or ``""``."""
    if r.arch < 80 or not r.bytes_in_flight or r.bytes_moved < ARCHS[r.arch].sms * 64 * 1024:
        return ""
    if SHAPES[r.shape].hidden > ROW_IN_REGISTERS:
        return ""
    pipelined = r.stages >= 2
    # A launch whose every load an SM can issue at once (one wave) cannot keep more in flight.
    reads_per_sm = r.bytes_moved // (2 * ARCHS[r.arch].sms)
    programs, target = (2 if pipelined else MIN_PROGRAMS_PER_SM), min(IN_FLIGHT[r.arch], reads_per_sm)
    short = [f"{r.resident} programs per SM (< {programs})" if r.resident < programs else "",
             f"{r.in_flight_per_sm // 1024} KB in flight per SM (< {target // 1024})" if r.in_flight_per_sm < target else "",
             "no 128-bit loads" if not r.wide_loads else ""]  # fmt: skip
    return ", ".join(x for x in short if x)


@dataclasses.dataclass(frozen=True)
class Allowed:
    pattern: tuple[str, ...]  # kernel dtype shape arch rule, each an fnmatch pattern
    reason: str
    line: int


def read_allow_list(path: Path) -> list[Allowed]:
    """Parse ``kernel dtype shape arch rule  # reason`` lines; a line without a reason is refused."""
    allowed = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        body, _, reason = raw.partition("#")
        if not body.strip():
            continue
        fields = tuple(body.split())
        if len(fields) != 5 or not reason.strip():
            raise ValueError(f"{path}:{number}: expected 'kernel dtype shape arch rule  # reason'; got {raw!r}")
        allowed.append(Allowed(fields, reason.strip(), number))
    return allowed


def _matches(allowed: Allowed, v: Violation) -> bool:
    return all(fnmatch.fnmatchcase(value, pattern) for value, pattern in zip(v.fields(), allowed.pattern))


def markdown(results: Sequence[Result]) -> str:
    """The README's table: one row per kernel, one cell per arch, saying in words what was found.

    A cell counts the (dtype, shape) groups checked there and names those with a compile error or
    a config over the shared-memory limit; ``spills`` counts the groups whose every fitting config
    spills, with the smallest such spill. ``mma`` marks kernels that reach the tensor cores there;
    a dot kernel without it runs its matmuls on FMA units. ``not used``: the op dispatches to
    another path on that arch.
    """
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.kernel, r.arch)].append(r)
    kernels = sorted({r.kernel for r in results})
    archs = sorted({r.arch for r in results})
    uses_mma = {r.kernel for r in results if r.mma}
    lines = ["| kernel | " + " | ".join(f"sm_{a} {ARCHS[a].gpu}" for a in archs) + " |", "|---|" + "---|" * len(archs)]
    for kernel in kernels:
        cells = []
        for arch in archs:
            by_case: dict[tuple, list[Result]] = defaultdict(list)
            for r in groups[(kernel, arch)]:
                by_case[(r.dtype, r.shape)].append(r)
            if not by_case:  # the op takes another path on this arch
                cells.append("not used")
                continue
            errors = [f"{d} {s}" for (d, s), g in by_case.items() if any(r.error for r in g)]
            over = [f"{d} {s}" for (d, s), g in by_case.items() if any(not r.error and not r.fits for r in g)]
            spills = [min(r.spill_bytes for r in g if r.fits) for g in by_case.values()
                      if any(r.fits for r in g) and all(r.spill_bytes for r in g if r.fits)]  # fmt: skip
            parts = [f"error: {', '.join(errors)}"] if errors else []
            parts += [f"over smem: {', '.join(over)}"] if over else []
            parts += [f"spills in {len(spills)} (≥ {min(spills)} B)"] if spills else []
            cell = f"{len(by_case)} ok" if not parts else f"{len(by_case)}: " + "; ".join(parts)
            if kernel in uses_mma:
                cell += ", mma" if any(r.mma for r in groups[(kernel, arch)]) else ", **no mma**"
            cells.append(cell)
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def variant_table(results: Sequence[Result]) -> str:
    """Every compiled variant, one line each, for looking at the whole matrix."""
    out = [f"{'kernel':34} {'dtype':5} {'shape':8} {'arch':6} {'config':46} {'smem':>7} {'regs':>4} {'spill':>6} mma "
           f"{'waves':>6} {'res':>3} {'KB/SM':>6} v4"]  # fmt: skip
    for r in sorted(results, key=lambda r: (r.kernel, r.dtype, r.shape, r.arch, r.config)):
        if r.error:
            out.append(f"{r.kernel:34} {r.dtype:5} {r.shape:8} sm_{r.arch:<3} {r.config:46} ERROR {r.error}")
            continue
        flag = "" if r.fits else "  > smem limit"
        flight = f"{r.resident:3d} {r.in_flight_per_sm // 1024:6d} {'yes' if r.wide_loads else 'no'}" if r.bytes_in_flight else ""
        out.append(f"{r.kernel:34} {r.dtype:5} {r.shape:8} sm_{r.arch:<3} {r.config:46} {r.shared:7d} {r.regs:4d} "
                   f"{r.spill_bytes:6d} {'yes' if r.mma else 'no ':3} {r.waves:6.2f} {flight}{flag}")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog="python -m lash_kernels.aot_check",
        description="Compile every LASH Triton kernel for sm_75/80/89/90 without a GPU and check "
        "shared memory, spills and compile errors.",
    )
    parser.add_argument("--full", action="store_true", help="every shape and dtype (default: CI's subset)")
    parser.add_argument("--archs", type=arch_list, help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--shapes", type=name_list(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", type=name_list(DTYPES), help=f"comma-separated of {', '.join(DTYPES)}")
    parser.add_argument("--allow", type=Path, help="allow-list file of known violations")
    parser.add_argument("--extra", type=Path, action="append", default=[], help="also check this op file")
    parser.add_argument("--only-extra", action="store_true", help="check the --extra files alone")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--table", action="store_true", help="print every variant")
    parser.add_argument("--markdown", type=output_file, help="write the per-arch summary table here")
    parser.add_argument("--json", type=output_file, help="write every variant's figures here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, not ours
    if interpreting():
        parser.error("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be ≥ 1")
    for path in [*args.extra, *([args.allow] if args.allow else [])]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        allowed = read_allow_list(args.allow) if args.allow else []
    except ValueError as exc:
        parser.error(str(exc))
    scope = dict(FULL if args.full else SUBSET)
    for name in ("shapes", "dtypes", "archs"):
        scope[name] = getattr(args, name) or scope[name]

    modules = load_ops(args.extra)
    if args.only_extra:
        modules = modules[len(OPS):]
    jobs = collect(modules, **scope)
    results = run(jobs, args.workers)
    if args.table:
        print(variant_table(results), end="")
    if args.markdown:
        args.markdown.write_text(markdown(results))
    if args.json:
        rows = [dict(dataclasses.asdict(r), fits=r.fits, waves=round(r.waves, 3)) for r in results]
        args.json.write_text(json.dumps(dict(triton=__import__("triton").__version__, scope=scope, variants=rows), indent=1))
    return report(results, allowed, scope)


def report(results: Sequence[Result], allowed: Sequence[Allowed], scope: dict) -> int:
    """Print the verdict; 0 when every violation is allow-listed and every allow-list line is used."""
    found = violations(results)
    used: set[int] = set()
    failures = []
    for v in found:
        match = next((a for a in allowed if _matches(a, v)), None)
        if match is None:
            failures.append(v)
        else:
            used.add(match.line)
    # A line is stale only if the groups it names were checked at all in this run.
    checked = {(r.kernel, r.dtype, r.shape, f"sm_{r.arch}") for r in results}
    stale = [
        a for a in allowed
        if a.line not in used and any(all(fnmatch.fnmatchcase(x, p) for x, p in zip(g, a.pattern)) for g in checked)
    ]  # fmt: skip
    groups = len({(r.kernel, r.dtype, r.shape, r.arch) for r in results})
    print(f"aot_check: {len(results)} variants in {groups} groups "
          f"(shapes {','.join(scope['shapes'])}; dtypes {','.join(scope['dtypes'])}; "
          f"archs {','.join(f'sm_{a}' for a in scope['archs'])}); {len(found)} violations, "
          f"{len(found) - len(failures)} allow-listed")  # fmt: skip
    for v in failures:
        print(f"FAIL {' '.join(v.fields())}: {v.detail}")
    for a in stale:
        print(f"FAIL allow-list line {a.line} ({' '.join(a.pattern)}) matches no violation: remove it")
    ok = not failures and not stale
    print("aot_check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
