import multiprocessing as mp

import pytest

from sharp.errors import SharpError
from sharp.io.lock import output_lock


def _hold(path, ready, release):
    with output_lock(path):
        ready.set()
        release.wait(10)


def test_second_writer_is_refused_while_first_holds_the_lock(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path / "out", ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(SharpError, match="being written by pid"):
            with output_lock(tmp_path / "out"):
                pass
    finally:
        release.set()
        p.join(10)
    with output_lock(tmp_path / "out"):  # free again once the holder is gone
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path / "out", ready, release))
    p.start()
    assert ready.wait(30)
    p.kill()
    p.join(10)
    with output_lock(tmp_path / "out"):
        pass
