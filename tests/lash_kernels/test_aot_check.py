"""The static GPU check: LASH's kernels pass it for every arch, and it catches what it must.

The compiling tests run ``python -m lash_kernels.aot_check`` in a subprocess without
``TRITON_INTERPRET``: the interpreter replaces ``triton.jit`` functions, which then cannot be
compiled. The rule tests feed :func:`violations` hand-made results, so they need no compiler.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lash_kernels.tools.aot_check import Allowed, Result, read_allow_list, report, violations

HERE = Path(__file__).parent
ALLOW_LIST = HERE / "aot_allowlist.txt"

pytest.importorskip("triton")


def _check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "lash_kernels.aot_check", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


def test_every_kernel_compiles_and_fits_on_every_arch():
    done = _check("--allow", str(ALLOW_LIST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aot_check: PASS" in done.stdout


def test_a_kernel_over_the_shared_memory_limit_fails_the_check():
    done = _check("--extra", str(HERE / "planted_overflow.py"), "--only-extra", "--shapes", "seed",
                  "--dtypes", "bf16", "--archs", "sm_80,sm_90")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    for arch in ("sm_80", "sm_90"):
        assert f"FAIL planted.overflow bf16 seed {arch} fit" in done.stdout


def test_a_kernel_that_starves_the_memory_system_fails_the_occupancy_rule():
    done = _check("--extra", str(HERE / "planted_narrow.py"), "--only-extra", "--shapes", "seed",
                  "--dtypes", "bf16", "--archs", "sm_75,sm_90")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("FAIL planted.narrow bf16 seed sm_90 occupancy"))
    assert "KB in flight per SM (< 64)" in line and "no 128-bit loads" in line
    assert "sm_75 occupancy" not in done.stdout  # the rule starts at sm_80


def test_bad_arguments_exit_2_with_the_value():
    done = _check("--archs", "sm_70")
    assert done.returncode == 2
    assert "sm_70" in done.stderr and "sm_75" in done.stderr


def _result(**kwargs) -> Result:
    base = dict(kernel="op.k", dtype="bf16", shape="seed", arch=90, config="c", programs=1000, shared=1024, regs=64)
    return Result(**{**base, **kwargs})


def test_rules_compile_fit_and_spill():
    found = violations([
        _result(kernel="a", error="CompilationError: boom"),
        _result(kernel="b", shared=300 * 1024),  # over the H100's 227 KiB
        _result(kernel="b", config="small"),  # the autotuner would still try the big one
        _result(kernel="c", spill_bytes=64),
        _result(kernel="c", config="d", shared=200 * 1024, spill_bytes=8),
        _result(kernel="d", spill_bytes=64),
        _result(kernel="d", config="e"),  # one spill-free fitting config is enough
        _result(kernel="e", dtype="fp32", spill_bytes=64),  # fp32 may spill
        _result(kernel="f", arch=75, spill_bytes=64),  # no spill rule below sm_80
    ])  # fmt: skip
    assert [(v.kernel, v.rule) for v in found] == [("a", "compile"), ("b", "fit"), ("c", "spill")]
    assert "300 KiB" in found[1].detail and "227 KiB" in found[1].detail


def test_rule_occupancy():
    """Memory-bound variants need 128-bit loads and enough bytes in flight through enough programs;
    small launches, wide rows, compute-bound kernels and sm_75 are exempt."""
    big = 132 * 1024 * 1024  # bytes moved: a launch far above one wave on an H100

    def memory_bound(kernel, **kwargs):
        base = dict(kernel=kernel, shape="llm", programs=132 * 8, bytes_in_flight=16 * 1024, bytes_moved=big,
                    wide_loads=True, blocks_per_sm=8, stages=1)  # fmt: skip
        return _result(**{**base, **kwargs})

    found = violations([
        memory_bound("ok"),  # 8 programs × 16 KB = 128 KB
        memory_bound("few", blocks_per_sm=3),  # 3 programs, unpipelined
        memory_bound("pipelined", blocks_per_sm=2, stages=3, bytes_in_flight=32 * 1024),  # 2 are enough there
        memory_bound("shallow", bytes_in_flight=4 * 1024),  # 32 KB in flight
        memory_bound("narrow", wide_loads=False),
        memory_bound("grid", programs=132 * 2),  # the grid, not the resources, leaves 2 per SM
        memory_bound("small", bytes_moved=132 * 32 * 1024, bytes_in_flight=1024),  # under 64 KB per SM
        memory_bound("one-wave", bytes_moved=132 * 8 * 2 * 1024 * 2, bytes_in_flight=2 * 1024),  # all reads at once
        memory_bound("wide", shape="max", bytes_in_flight=1024),  # 16K-wide rows: not held to it
        memory_bound("old", arch=75, bytes_in_flight=1024),
        _result(kernel="compute", programs=132),  # declares no bytes in flight
    ])  # fmt: skip
    details = {v.kernel: v.detail for v in found if v.rule == "occupancy"}
    assert set(details) == {"few", "shallow", "narrow", "grid"}, details
    assert "3 programs per SM (< 4)" in details["few"]
    assert "32 KB in flight per SM (< 64)" in details["shallow"] and "programs" not in details["shallow"]
    assert details["narrow"].endswith("no 128-bit loads")
    assert "2 programs per SM (< 4)" in details["grid"]


def test_allow_list_silences_its_violation_and_must_not_go_stale(tmp_path, capsys):
    results = [_result(kernel="b", shared=300 * 1024), _result(kernel="ok")]
    scope = dict(shapes=("seed",), dtypes=("bf16",), archs=(90,))
    allow = tmp_path / "allow.txt"
    allow.write_text("b bf16 seed sm_90 fit  # planted\n")
    assert report(results, read_allow_list(allow), scope) == 0
    allow.write_text("b bf16 seed sm_90 fit  # planted\nok * * * spill  # nothing spills\n")
    assert report(results, read_allow_list(allow), scope) == 1
    assert "line 2" in capsys.readouterr().out


def test_allow_list_lines_need_five_fields_and_a_reason(tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("b bf16 seed sm_90 fit\n")
    with pytest.raises(ValueError, match="allow.txt:1"):
        read_allow_list(allow)
    allow.write_text("# comment\n\nb * seed sm_9? fit  # why\n")
    assert read_allow_list(allow) == [Allowed(("b", "*", "seed", "sm_9?", "fit"), "why", 3)]
