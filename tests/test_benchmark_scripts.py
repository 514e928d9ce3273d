"""The GPU run's benchmark scripts run end to end on the CPU, small, and write what they promise:
``decode_bench.py --dry-run`` and a short ``e2e_ashem.py``; a stopped decode_bench training resumes;
``gpu_all.sh`` runs the steps it is given into no more files than a device call brings back;
``cpu_host_time.py`` prints its rows."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_decode_bench_dry_run_writes_every_mode_with_its_ratios(tmp_path):
    _run("decode_bench.py", "--dry-run", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "decode.json").read_text())["rows"]
    assert {row["batch"] for row in rows} == {1, 2}
    for batch in (1, 2):
        modes = [row["mode"] for row in rows if row["batch"] == batch]
        assert modes[0] == "plain" and sum(m.startswith("early exit") for m in modes) == 3 + (batch > 1)
        assert sum(m.startswith("speculative") for m in modes) == 3
    plain = [row for row in rows if row["mode"] == "plain"]
    assert all(row["speedup_vs_plain"] == 1.0 for row in plain)
    for row in rows:
        assert row["tokens_per_s"] > 0 and {"shallow_ratio", "executed_layer_ratio", "acceptance_rate"} <= set(row)
        assert ("bytes_ideal" in row) == row["mode"].startswith("early exit")
        assert ("same_tokens_as_plain" in row) == row["mode"].startswith("speculative")
        assert row.get("same_tokens_as_plain", True) is True
    table = (tmp_path / "out" / "decode.md").read_text()
    assert "| batch | mode | tokens/s |" in table and "Speculative tokens equal plain decoding's: every row." in table


@pytest.mark.slow
def test_e2e_ashem_times_both_paths_and_prints_the_ratio(tmp_path):
    done = _run("e2e_ashem.py", "--device", "cpu", "--samples", "300", "--epochs", "1", "--json", str(tmp_path / "e2e.json"))
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert set(rows) == {"eager (lash.original, plain loop)", "LASH default path"}
    for row in rows.values():
        assert row["total"] >= row["phase1"] + row["phase2"] - 1e-6 > 0 and row["phase1_tokens"] > 0
    assert "end to end, capturing and compiling included: LASH" in done.stdout


def test_decode_bench_training_stopped_at_a_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import decode_bench
    from lash import DeepSupervisionTransformer, Trainer
    from lash.data import load_dataset

    args = argparse.Namespace(layers=2, exit_layer=1, train_steps=4, eval_every=2)
    data = load_dataset("offline", 32, 4, 8, seed=0, max_vocab=64)

    def trained(seed: int, path: Path) -> dict:
        torch.manual_seed(seed)
        model = DeepSupervisionTransformer(data.vocab_size, 16, 2, 2, max_seq_len=8, exit_layer=1)
        decode_bench.train(model, data, args, path)
        return model.state_dict()

    straight = trained(0, tmp_path / "straight.ckpt")
    save = Trainer.save_checkpoint

    def stop_after_saving(trainer, path, extra=None):
        save(trainer, path, extra)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", stop_after_saving)
        with pytest.raises(KeyboardInterrupt):
            trained(0, tmp_path / "stopped.ckpt")
    resumed = trained(1, tmp_path / "stopped.ckpt")  # another init: everything comes from the checkpoint
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_decode_bench_hugging_face_rows_end_with_model_generate_against_lash_plain(monkeypatch, capsys):
    """The rows a GPU run adds, on a Llama shrunk from the benchmark's config: LASH's modes print
    first, then ``model.generate`` timed beside LASH's plain decoding, and the table states the ratio."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import decode_bench

    full = transformers.LlamaConfig
    small = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    monkeypatch.setattr(transformers, "LlamaConfig", lambda **kw: full(**{**kw, **small}))
    args = argparse.Namespace(new=4, repeats=1, dim=64, layers=6, exit_layer=4, vocab=256, prompt=8, out=None)
    rows = decode_bench.hf_rows(args)
    assert [row["mode"] for row in rows][-1] == decode_bench.MODEL_GENERATE
    assert rows[0]["mode"] == "hf llama-1b plain" and rows[0]["speedup_vs_plain"] == 1.0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(rows) and decode_bench.MODEL_GENERATE in printed[-1]  # model.generate, the slow one, last
    table = decode_bench.markdown(rows, args)
    ratio = 1 / rows[-1]["speedup_vs_plain"]
    assert f"LASH's plain decoding is {ratio:.2f}× `model.generate`" in table


def _gpu_all(tmp_path: Path, *steps: str) -> subprocess.CompletedProcess:
    """``gpu_all.sh`` with ``python3`` and ``nvidia-smi`` stood in for by scripts that write what
    the real ones would (a file wherever ``--out`` points) and log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho GPU\n")
    (bin_dir / "python3").write_text(
        '#!/bin/sh\necho "$*" >>"$CALLS"\nwhile [ $# -gt 0 ]; do\n'
        '  if [ "$1" = --out ]; then mkdir -p "$2"; echo x >"$2/gpu_suite.md"; echo x >"$2/gpu_suite.json"; fi\n'
        "  shift\ndone\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_all.sh"), str(tmp_path / "out"), *steps],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_gpu_all_runs_every_step_into_at_most_eight_files_and_only_the_steps_named(tmp_path):
    done = _gpu_all(tmp_path)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text()
    for script in ("pytest", "decode_bench.py", "gpu_suite.py", "e2e_ashem.py"):
        assert script in calls
    assert "--compare" in calls  # the kernel rows' second run, against the first run's file
    assert "hf_" not in calls  # the Hugging Face step runs only when named
    assert _gpu_all(tmp_path, "hf").returncode == 0
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # what a device call brings back, every step run
    (tmp_path / "calls").unlink()
    done = _gpu_all(tmp_path, "e2e", "decode")
    assert done.returncode == 0, done.stderr
    scripts = [line.split()[0] for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("benchmarks/")]
    assert scripts == ["benchmarks/e2e_ashem.py", "benchmarks/decode_bench.py"]


def test_gpu_all_refuses_an_unknown_step_before_running_anything(tmp_path):
    done = _gpu_all(tmp_path, "decode", "sutie")
    assert done.returncode == 2 and "sutie" in done.stderr
    assert not (tmp_path / "calls").exists()


def test_cpu_host_time_prints_every_row_with_launches_stubbed():
    out = _run("cpu_host_time.py", "--rounds", "1", "--calls", "3").stdout
    rows = [line for line in out.splitlines() if line.endswith(" µs")]
    assert len(rows) == 9 and all(float(line.split()[-2]) > 0 for line in rows)
    assert "rms_norm forward+backward 8×1024" in out and "multi-exit CE forward+backward N256 D64 V2048 K4" in out
