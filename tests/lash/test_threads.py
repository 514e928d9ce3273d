"""--threads: a fixed count, or auto, which gives torch the cores other processes leave free."""

import pytest
import torch

from lash import cli, threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    threads.use(before)


@pytest.mark.parametrize("others, cores, wanted", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (5.0, 2, 1),
                                                   (1.2, 8, 7), (0.0, 1, 1)])  # fmt: skip
def test_free_threads_leave_the_cores_others_use(others, cores, wanted):
    assert threads.free_threads(others, cores) == wanted


def test_others_busy_cores_subtract_this_process():
    # 2 s of wall time; the machine was busy for 3 CPU-seconds, 1.2 of them this process's own.
    assert threads.others_busy_cores((10.0, 100.0, 5.0), (12.0, 103.0, 6.2)) == pytest.approx(0.9)
    assert threads.others_busy_cores((10.0, 100.0, 5.0), (10.0, 100.0, 5.0)) == 0.0


def test_auto_follows_the_load_at_every_refresh(monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    # (wall, machine busy, own CPU): idle at the start, then one other process busy, then idle again.
    looks = iter([(0.0, 0.0, 0.0), (1.0, 0.05, 0.0), (11.0, 20.05, 10.0), (21.0, 40.05, 30.0)])
    monkeypatch.setattr(threads, "_snapshot", lambda: next(looks))
    assert threads.use("auto") == 2
    threads.refresh()  # the other process took a core: 1 thread
    assert torch.get_num_threads() == 1
    threads.refresh()  # this process alone used both cores: 2 again
    assert torch.get_num_threads() == 2


def test_a_fixed_count_is_kept_and_refresh_leaves_it(monkeypatch):
    assert threads.use("1") == 1
    monkeypatch.setattr(threads, "_snapshot", lambda: pytest.fail("a fixed count never measures the load"))
    threads.refresh()
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_bad_thread_counts_are_refused(bad, capsys):
    with pytest.raises(ValueError, match="auto' or a whole number"):
        threads.use(bad)
    assert cli.main(["train", "--dataset", "offline", "--threads", bad, "--no-progress"]) == 2
    assert f"--threads {bad!r} must be auto or a whole number ≥ 1" in capsys.readouterr().err
