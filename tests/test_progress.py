"""Progress bars never make one process wait on another: a process killed while it draws a bar
(``kill -9``) must not leave a lock held for the processes forked beside it."""

from __future__ import annotations

import os
import signal
import threading

from tqdm import tqdm

from sparsestitch.core import progress


def test_a_process_killed_holding_the_bar_lock_blocks_no_relative():
    lock = tqdm.get_lock()  # the lock every tqdm bar takes to draw
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies holding it, as a kill mid-update does
        try:
            lock.acquire()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    # tqdm's default lock is a multiprocessing semaphore: the parent would wait here forever
    assert lock.acquire(timeout=5), "a dead child's progress bar still holds the lock"
    lock.release()


def test_a_quiet_bar_is_silent_and_takes_no_lock(capsys):
    held, done = threading.Event(), threading.Event()

    def hold():  # another thread holds the bar lock: a quiet run must not wait for it
        with tqdm.get_lock():
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        with progress.bar(100, "encode", enabled=False) as shown:
            shown.update(40)
            shown.update(60)
    finally:
        done.set()
        holder.join()
    assert isinstance(shown, progress.Silent)
    assert capsys.readouterr() == ("", "")
