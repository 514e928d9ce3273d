"""One command on a GPU: the CUDA tests, every benchmark subject, and one table of DESIGN.md's bars.

    python benchmarks/gpu_suite.py --out DIR            # on a CUDA machine (gpu_all.sh gives it 165 s)
    python benchmarks/gpu_suite.py --out DIR --quick    # fewer shapes and dtypes
    python benchmarks/gpu_suite.py --out DIR --dry-run  # on the CPU: tiny shapes, checks the machinery
    python benchmarks/gpu_suite.py --out DIR --no-tests # the benchmarks alone
    python benchmarks/gpu_suite.py --out DIR2 --only kernels --compare DIR/gpu_suite.json
                                                        # the norm and RoPE rows again, against DIR's

Steps: the ``gpu``-marked tests under ``tests/`` with ``LASH_KERNELS=triton``; the device's copy
bandwidth and bf16 matmul throughput (INFO); then each subject: the multi-exit loss,
RMSNorm/add+RMSNorm, RoPE, host time per eager call, early exit, host syncs, the seed training
step. The kernel subjects time every provider of a row side by side (``measure.py``): inputs
and gradients allocated first, device time by CUDA-graph replay over rotating input sets (a
call that synchronises with the host, such as Liger-Kernel's loss, by eager calls between CUDA
events), the providers interleaved over ``measure.REPEATS`` rounds, each reported as its median
with its spread over the rounds (in the row's note and the JSON). A norm or RoPE row is stated
against a device copy of the same bytes timed the same way, its note giving the bytes; the loss
against the bare head matmuls of the same shapes. Host time per eager call is timed on tiny
inputs, where the device keeps up with the host. Early exit and the training step are timed per call with
``triton.testing.do_bench``. ``--compare`` adds a row per norm and RoPE measurement with the
largest relative difference of its ratios from an earlier run's JSON: a row that moves more
than 10% between two runs is not settled. Shapes follow the device's memory: an L4 (24 GB)
gets smaller LLM-sized configs than an H100. It prints one Markdown table (measured, target,
PASS/FAIL, or SKIPPED/ERROR with the reason) under the device, versions and date, and writes
``DIR/gpu_suite.json`` (every measurement) and ``DIR/gpu_suite.md``. A dry run gives no
PASS/FAIL: its numbers are CPU timings of the torch paths at tiny shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so `python benchmarks/gpu_suite.py` runs from a checkout, lash not installed

import kernel_bench  # noqa: E402 - needs REPO on the path
import measure  # noqa: E402
import model_bench  # noqa: E402
from measure import ON_GPU  # noqa: E402
from suite_rows import Row, Suite, attempt, dry_compile, markdown, ratio_row, side_by_side, spreads, store  # noqa: E402

from lash.files import check_writable_dir  # noqa: E402
from lash.routing import early_exit_forward  # noqa: E402

TESTS_TIMEOUT_S = 300  # the tests' share when the suite runs them
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Speed each mode must reach as a fraction of a same-size copy's (copy time / lash time).
COPY_FRACTION = {"forward": 0.90, "backward": 0.80, "forward+backward": 0.85}
HOST_US = 15  # host time per eager call, µs
AGREEMENT = 0.10  # largest relative difference between two runs' norm and RoPE ratios
# The loss at the seed's width: lash / bare matmuls by dtype, the dtypes the suite measures there.
SEED_WIDTH_MATMULS = {"fp32": 1.0, "bf16": 1.5}


# ---------------------------------------------------------------- subjects


def gpu_tests(suite: Suite) -> None:
    """The ``gpu``-marked tests, on CUDA with the Triton backend, in a subprocess."""
    bar, target = "tests -m gpu (CUDA, LASH_KERNELS=triton)", "all pass"
    if suite.dry:
        suite.skip(bar, target, "dry run: needs a CUDA device")
        return
    env = os.environ | {"LASH_KERNELS": "triton"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        suite.add(Row(bar, "–", target, "FAIL", f"timed out after {TESTS_TIMEOUT_S} s"))
        return
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    suite.measurements["gpu_tests"] = {"returncode": done.returncode, "summary": summary, "tail": done.stdout[-4000:]}
    status = "PASS" if done.returncode == 0 else "FAIL"
    suite.add(Row(bar, summary, target, status, "" if status == "PASS" else "see gpu_suite.json: gpu_tests"))


def ceilings(suite: Suite) -> None:
    """The device's copy bandwidth and matmul throughput at one large size, for reference (the bars
    are stated against ceilings of their own size)."""
    copy, flops = measure.copy_bandwidth_gbps(), measure.matmul_tflops()
    suite.measurements["ceilings"] = {"copy_gbps": copy, "matmul_tflops": flops}
    suite.info("ceiling: device copy bandwidth", f"{copy:.0f} GB/s", "read + write bytes, 1 GiB fp32 copy")
    suite.info("ceiling: dense matmul", f"{flops:.3g} TFLOP/s", "bf16 8192³" if ON_GPU else "fp32 1024³ (CPU)")


def train_step(suite: Suite) -> None:
    vocab, batch = (2048, 8) if suite.dry else (16384, model_bench.BATCH)
    for precision in ("fp32",) if suite.dry else ("fp32", "bf16"):
        record: dict = {"vocab": vocab, "batch": batch, "precision": precision}
        peaks: dict = {}
        for provider in model_bench.TRAIN_PROVIDERS:
            if dry_compile(suite, record, provider):
                continue
            built = attempt(lambda provider=provider: model_bench.train_step_call(provider, vocab, precision, batch))
            if isinstance(built, str):  # could not be built here (a graph without CUDA) or failed: its rows say why
                record[f"{provider}_s"], peaks[provider] = built, None
                continue
            step = built
            # The first call's peak: a CUDA graph allocates at capture what its replays reuse, so a
            # replay allocates nothing new; every provider's first call also makes its AdamW state.
            peaks[provider] = measure.peak_memory_bytes(step)
            record[f"{provider}_kernels"] = measure.device_kernels(step)
            store(record, f"{provider}_s", lambda: measure.median_seconds(step))
            if provider == "lash-compile":
                record["compile"] = measure.compile_counts()
        record["peak_bytes"] = peaks
        suite.measurements[f"train_step_{precision}"] = record
        name = f"seed train step {precision} (B {batch}, V {vocab}, all 4 exits)"
        # The bar is the Trainer's default path (on CUDA: forward and backward replayed from a CUDA
        # graph, the fused AdamW); eager kernels, the compiled loss and the whole step with the
        # optimizer in one graph, each with a plain AdamW, are context.
        ratio_row(suite, f"{name}: default path speedup vs eager", record["eager_s"], record["lash-default_s"], "≥ 3×",
                  lambda r: r >= 3)  # fmt: skip
        ratio_row(suite, f"{name}: lash eager kernels speedup vs eager", record["eager_s"], record["lash_s"], "–", None)
        missing = [provider for provider in ("lash-default", "eager") if peaks.get(provider) is None]
        if missing:
            why = f"{' and '.join(missing)} did not run (see its time row)" if ON_GPU else "peak memory is measured on CUDA only"
            suite.skip(f"{name}: peak memory vs eager", "≤ 0.25", why)
        else:
            suite.judge(f"{name}: peak memory vs eager", peaks["lash-default"] / peaks["eager"], "≤ 0.25", lambda r: r <= 0.25)
        ratio_row(suite, f"{name}: lash-compile speedup vs eager", record["eager_s"], record["lash-compile_s"],
                  "–", None, f"dynamo {record.get('compile')}")
        ratio_row(suite, f"{name}: lash eager step as one CUDA graph, speedup vs eager", record["eager_s"],
                  record["lash-graphed_s"], "–", None)  # fmt: skip
        if record.get("lash-default_kernels") is None:
            suite.skip(f"{name}: device kernels per step (default path, optimizer included)", "≤ 120",
                       "the profiler counts CUDA kernels")  # fmt: skip
        else:
            suite.judge(f"{name}: device kernels per step (default path, optimizer included)", record["lash-default_kernels"],
                        "≤ 120", lambda n: n <= 120,
                        note=f"eager {record.get('eager_kernels')}, lash eager kernels {record.get('lash_kernels')}")  # fmt: skip
    if not suite.dry:  # autocast's casts must not make the default path slower than fp32
        fp32, bf16 = (suite.measurements[f"train_step_{p}"]["lash-default_s"] for p in ("fp32", "bf16"))
        ratio_row(suite, "seed train step, default path: bf16 time / fp32 time", bf16, fp32, "≤ 1",
                  lambda r: r <= 1, "each the median of its own do_bench run, one after the other")  # fmt: skip


def host_syncs(suite: Suite) -> None:
    vocab = 16384
    for provider in ("lash", "lash-default", "lash-compile"):
        bar = f"no host sync in a training step ({provider}, seed config)"
        if not ON_GPU:
            suite.skip(bar, "0", "torch.cuda.set_sync_debug_mode needs a CUDA device")
            continue
        places = measure.host_syncs(model_bench.train_step_call(provider, vocab))
        suite.measurements[f"host_syncs_{provider}"] = places
        status = "FAIL" if places else "PASS"
        suite.add(Row(bar, f"{len(places)} places", "0", status, "; ".join(places)))


def _ce_shapes(suite: Suite) -> Iterator[tuple[tuple[int, int, int, int], str, bool]]:
    """(N, D, V, K), dtype and whether it is the LLM-sized head: the seed's width D 64 in each
    dtype, then an LLM-sized head in bf16 (in a dry run, one tiny shape of each kind)."""
    if suite.dry:
        yield (256, 32, 1024, 3), "fp32", False
        yield (128, 128, 2048, 2), "fp32", True
        return
    for dtype in ("bf16",) if suite.quick else SEED_WIDTH_MATMULS:  # fp16 has no bar: the same kernels as bf16
        yield (2048, 64, 16384, 4), dtype, False
    if not suite.quick:
        yield ((8192, 4096, 65536, 4) if measure.large_device() else (4096, 2048, 32768, 4)), "bf16", True


def multi_exit_ce(suite: Suite) -> None:
    """The K-exit loss (forward + backward) against the bare head matmuls, Liger-Kernel and Cut
    Cross-Entropy per exit, eager and ``torch.compile`` (seed width only: at the LLM size their
    graphs would hold the K·N·V fp32 logits while every provider stays allocated), and its peak memory."""
    for shape, dtype_key, llm in _ce_shapes(suite):
        n, d, v, k = shape
        dtype = DTYPES[dtype_key]
        name = f"multi-exit CE {dtype_key} N{n} D{d} V{v} K{k}"
        record: dict = {"shape": list(shape), "dtype": dtype_key}
        lash_calls = {}

        def build(provider: str) -> measure.Rotation:
            calls = kernel_bench.ce_calls(provider.removesuffix("-eager"), shape, dtype)
            if provider == "lash":
                lash_calls["lash"] = calls  # kept for its peak memory, read once the timers are gone
            return calls

        # "lash-eager": LASH by eager calls, the like-for-like peer of a loss that syncs (Liger, CCE).
        # torch.compile is context, not a bar: on a GPU compiled in bf16 only (a compile costs 15-30 s of the box).
        compiles = not llm and (dtype_key == "bf16" or not ON_GPU)
        providers = [p for p in (kernel_bench.CE_PROVIDERS if not llm else ("matmuls", "liger", "cce", "lash"))
                     if p != "compile" or compiles] + ["lash-eager"]  # fmt: skip
        side_by_side(suite, record, {p: functools.partial(build, p) for p in providers}, eager=("lash-eager",))
        if "compile_s" in record and not isinstance(record["compile_s"], str):
            record["compile"] = measure.compile_counts()
        if "lash" in lash_calls:
            record["lash_peak_bytes"] = measure.peak_memory_bytes(lash_calls.pop("lash"))
        suite.measurements[name] = record
        lash = record["lash_s"]
        bound = 1.08 if llm else SEED_WIDTH_MATMULS.get(dtype_key)
        ratio_row(suite, f"{name}: lash / bare head matmuls", lash, record["matmuls_s"],
                  f"≤ {bound}×" if bound else "–", (lambda r: r <= bound) if bound else None,
                  spreads(record, "lash", "matmuls"))
        for peer, label, bar in (("liger", "Liger", 1.12 if llm else None), ("cce", "CCE", None if llm else 2)):
            base, how = _timed_alike(record, peer)
            ratio_row(suite, f"{name}: {label} per exit / lash", record[f"{peer}_s"], record[f"{base}_s"],
                      f"≥ {bar}×" if bar else "–", (lambda r, bar=bar: r >= bar) if bar else None,
                      f"{how}; {spreads(record, peer, base)}")
        if compiles:
            ratio_row(suite, f"{name}: torch.compile / lash", record["compile_s"], lash, "–", None,
                      f"dynamo {record.get('compile')}; {spreads(record, 'compile', 'lash')}")
        _peak_row(suite, name, shape, dtype, record.get("lash_peak_bytes"), llm)
        if llm:
            _fullgraph_row(suite, name, shape, dtype)


def _timed_alike(record: dict, peer: str) -> tuple[str, str]:
    """The LASH provider to judge ``peer`` against, timed as ``peer`` was, and how both were timed:
    a peer that syncs with the host runs eagerly, so LASH's eager calls, host time included, are
    its measure; otherwise both are graph replays, device time alone."""
    if str(record.get(f"{peer}_method", "")).startswith(measure.EAGER_METHOD):
        return "lash-eager", "both by eager calls between CUDA events (the peer syncs with the host)"
    return "lash", "both by CUDA graph replay" if ON_GPU else "both by wall clock"


def _peak_row(suite: Suite, name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, peak: int | None,
              judged: bool) -> None:
    bar, target = f"{name}: lash peak memory / (K·N·D + V·D)", "≤ 2.5×" if judged else "–"
    if peak is None:
        suite.skip(bar, target, "peak memory is measured on CUDA only")
        return
    n, _, v, k = shape
    floor = kernel_bench.ce_memory_floor_bytes(shape, dtype)
    note = (f"(K·N·D + V·D)·{kernel_bench.dtype_name(dtype)} = {floor / 2**20:.1f} MiB; "
            f"fp32 logits would be {k * n * v * 4 / 2**20:.0f} MiB")
    suite.judge(bar, peak / floor, target, (lambda r: r <= 2.5) if judged else None, "×", note)


def _fullgraph_row(suite: Suite, name: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """PASS when the LASH loss compiles with ``fullgraph=True`` (no graph break) and runs forward + backward."""
    bar, target = f"{name}: torch.compile(fullgraph=True) of the lash loss, forward + backward", "runs"
    if suite.dry:
        suite.skip(bar, target, "dry run: torch.compile runs on a GPU only")
        return
    ran = attempt(lambda: (kernel_bench.ce_call("lash-compile", *kernel_bench.ce_inputs(shape, dtype))(),
                            measure.synchronize()))
    if isinstance(ran, str):
        suite.add(Row(bar, "failed", target, "FAIL", ran))
    else:
        suite.add(Row(bar, "ran", target, "PASS", f"dynamo {measure.compile_counts()}"))


def _memory_bound(suite: Suite, op: str, label: str, size: tuple[int, ...], mode: str) -> None:
    """One norm or RoPE measurement: LASH, eager and Liger-Kernel beside a copy of the same bytes."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    moved = kernel_bench.bytes_moved(op, size, mode, dtype)
    record: dict = {"op": op, "size": list(size), "mode": mode, "dtype": kernel_bench.dtype_name(dtype),
                    "bytes_moved": moved}
    builders = {"copy": functools.partial(measure.same_size_copy, moved, dtype)}
    for provider in ("lash", "eager", "liger"):
        builders[provider] = functools.partial(kernel_bench.op_call, op, provider, size, mode, dtype)
    side_by_side(suite, record, builders)
    name = f"{label} {mode} {'×'.join(map(str, size))} {kernel_bench.dtype_name(dtype)}"
    suite.measurements[name] = record
    speeds = [f"{p} {moved / record[f'{p}_s'] / 1e9:.0f} GB/s" for p in ("lash", "copy")
              if not isinstance(record[f"{p}_s"], str)]
    note = "; ".join(filter(None, [f"{moved / 2**20:.1f} MiB moved", *speeds, spreads(record, "copy", "lash")]))
    fraction = COPY_FRACTION[mode]
    record["ratios"] = {
        "copy": ratio_row(suite, f"{name}: same-size copy / lash time", record["copy_s"], record["lash_s"],
                          f"≥ {fraction:.2f}×", lambda r: r >= fraction, note),
        "liger": ratio_row(suite, f"{name}: Liger / lash time", record["liger_s"], record["lash_s"], "≥ 1×",
                           lambda r: r >= 1, spreads(record, "liger", "lash")),
    }


def norms(suite: Suite) -> None:
    """RMSNorm and add+RMSNorm, forward and backward alone, at 16384 rows × 1024 and 4096 (bf16)."""
    sizes = [(256, 128)] if suite.dry else ([(16384, 4096)] if suite.quick else [(16384, 1024), (16384, 4096)])
    for op in ("rms_norm", "add_rms_norm"):
        for size in sizes:
            for mode in kernel_bench.NORM_MODES:
                _memory_bound(suite, op, op, size, mode)


def rotary(suite: Suite) -> None:
    """RoPE on q and k, forward + backward, at B 8 × H 32 × T 2048 × D 128 (bf16)."""
    size = (2, 4, 64, 32) if suite.dry else (8, 32, 2048, 128)
    _memory_bound(suite, "apply_rotary", "RoPE", size, "forward+backward")


def host_time(suite: Suite) -> None:
    """Host time per eager call of each LASH op, on inputs so small that the device keeps up."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    target, calls = f"≤ {HOST_US} µs", 10 if suite.dry else measure.HOST_CALLS
    for label, build in kernel_bench.host_rows(dtype).items():
        bar = f"host time per eager call: {label} {kernel_bench.dtype_name(dtype)}"
        result = attempt(lambda build=build: measure.interleaved({"lash": measure.host_timer(build(), calls)})["lash"])
        if isinstance(result, str):
            ratio_row(suite, bar, result, 1.0, target, None)  # the reason, as a SKIPPED or ERROR row
            continue
        suite.measurements[bar] = {"calls": calls, **result}
        note = f"{calls} calls, one sync after; spread over {measure.REPEATS} repeats: {result['spread']:.1%}"
        suite.judge(bar, result["median_s"] * 1e6, target, lambda us: us <= HOST_US, " µs", note)


def rerun_agreement(suite: Suite, earlier: Path) -> None:
    """A row per norm and RoPE measurement: the largest relative difference of its ratios
    (same-size copy / lash, Liger / lash) from those of the run in ``earlier``, relative to ``earlier``'s."""
    theirs_all = json.loads(earlier.read_text())["measurements"]
    for name, record in list(suite.measurements.items()):
        if "ratios" not in record:
            continue
        bar, target = f"{name}: difference from the earlier run", f"≤ {AGREEMENT:.0%}"
        theirs = theirs_all.get(name, {}).get("ratios", {})
        pairs = {key: (mine, theirs[key]) for key, mine in record["ratios"].items()
                 if isinstance(mine, float) and isinstance(theirs.get(key), float)}
        if not pairs:
            suite.skip(bar, target, f"no ratio of this measurement was taken both here and in {earlier}")
            continue
        record["agreement"] = {key: abs(mine - old) / old for key, (mine, old) in pairs.items()}
        note = "; ".join(f"{key} / lash {mine:.3g} here, {old:.3g} there" for key, (mine, old) in pairs.items())
        suite.judge(bar, 100 * max(record["agreement"].values()), target, lambda pct: pct <= 100 * AGREEMENT, "%",
                    f"{earlier}: {note}")


def early_exit(suite: Suite) -> None:
    configs = [model_bench.SEED_ROUTING, model_bench.LLM_ROUTING]
    if suite.dry:
        configs = [replace(model_bench.SEED_ROUTING, batch=8)]
    for config in configs:
        model, x = model_bench.build(config)
        with torch.no_grad():
            full = measure.median_seconds(lambda: model(x))
            for shallow in (0.5,) if suite.quick or suite.dry else (0.3, 0.5, 0.7, 0.9):
                threshold = model_bench.threshold_for(model, x, shallow)
                _, stats = early_exit_forward(model, x, threshold)
                early = measure.median_seconds(lambda: early_exit_forward(model, x, threshold))
                # The ideal counts the FLOPs really executed (exit statistics, exited tokens' deep keys
                # and values); 1/compute_cost, the nominal accounting, is reported beside it.
                speedup, ideal = full / early, 1 / stats["flop_ratio"]
                name = (f"early exit {config.name} (dim {config.dim}, {config.layers} layers, B {config.batch}, exit "
                        f"{config.exit_layer}), {stats['shallow_ratio']:.0%} shallow")
                suite.measurements[name] = {"forward_s": full, "early_exit_s": early, "speedup": speedup, "ideal": ideal,
                                            "ideal_compute_cost": 1 / stats["compute_cost"], **stats}
                note = f"speedup {speedup:.2f}× of ideal {ideal:.2f}× (1/compute_cost {1 / stats['compute_cost']:.2f}×)"
                if config is model_bench.LLM_ROUTING:
                    suite.judge(f"{name}: speedup / ideal 1/flop_ratio", speedup / ideal, "≥ 0.75", lambda r: r >= 0.75,
                                note=note)
                else:  # at the default size the exit head costs as much as the layers: no bar, the figure
                    suite.info(f"{name}: speedup / ideal 1/flop_ratio", f"{speedup / ideal:.2f}", note)
        del model, x


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Bad input: one line naming the flag and the value, exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="gpu_suite.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny shapes (no PASS/FAIL)")
    parser.add_argument("--no-tests", dest="tests", action="store_false",
                        help="skip the gpu-marked tests (when they ran on their own just before)")  # fmt: skip
    parser.add_argument("--only", choices=["kernels"], help="kernels: the norm and RoPE sections alone (no tests)")
    parser.add_argument("--compare", type=Path, metavar="JSON",
                        help="an earlier run's gpu_suite.json: add a row per norm and RoPE measurement with the "
                             "relative difference of its ratios")  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"argument --compare: {str(args.compare)!r} is not a file")
    if not ON_GPU and not args.dry_run:
        parser.error("no CUDA device here: add --dry-run to check the suite on the CPU")
    try:  # last: it creates the directory, which a refused run should not leave behind
        check_writable_dir("argument --out:", args.out)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not ON_GPU:
        # On a shared CPU, OpenMP threads competing with other processes time the contention.
        torch.set_num_threads(1)
    start = time.perf_counter()
    env = measure.environment()

    mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    if args.only:
        mode += f", {args.only} only"

    def save() -> str:
        """Write what has been measured so far, so a run cut short still leaves its finished rows;
        each file is replaced whole, so one cut while it is written keeps the previous version."""
        seconds = time.perf_counter() - start
        text = markdown(env, suite.rows, mode, seconds)
        result = {
            "environment": env,
            "mode": mode,
            "seconds": seconds,
            "section_seconds": suite.seconds,
            "rows": [asdict(r) for r in suite.rows],
            "measurements": suite.measurements,
        }
        for name, content in (("gpu_suite.json", json.dumps(result, indent=2, default=str) + "\n"), ("gpu_suite.md", text)):
            partial = args.out / f".{name}.partial"
            partial.write_text(content)
            os.replace(partial, args.out / name)
        return text

    suite = Suite(dry=args.dry_run, quick=args.quick, on_row=save)

    kernels = [("RMSNorm / add+RMSNorm", lambda: norms(suite)), ("RoPE", lambda: rotary(suite))]
    # The flagship loss first, then the quick subjects, then those that wait on torch.compile.
    sections = kernels if args.only == "kernels" else [
        ("ceilings", lambda: ceilings(suite)),
        ("multi-exit cross-entropy", lambda: multi_exit_ce(suite)),
        *kernels,
        ("host time per eager call", lambda: host_time(suite)),
        ("early exit", lambda: early_exit(suite)),
        ("host syncs", lambda: host_syncs(suite)),
        ("seed train step", lambda: train_step(suite)),
    ]
    if args.tests and not args.only:
        sections.insert(0, ("gpu tests", lambda: gpu_tests(suite)))
    if args.compare is not None:
        sections.append(("rerun agreement", lambda: rerun_agreement(suite, args.compare)))
    for name, fn in sections:
        suite.section(name, fn)
        text = save()
    print(text, end="")


if __name__ == "__main__":
    main()
