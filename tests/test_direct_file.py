"""Outputs written around the page cache (``core.direct_file``): the same bytes as through
it, whatever the pieces and the staging size; a short write or a filesystem refusing
``O_DIRECT`` goes on through the page cache; every command's output is byte-identical
with direct writes on and off; a write limit still gives the user's error."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestitch
from sparsestitch.core import direct_file
from sparsestitch.core.direct_file import ALIGN, DirectFile, writes_direct
from sparsestitch.core.errors import OptionError

from .conftest import save_checkpoint
from .support.processes import tree_digest
from .support.zoo import medium_finetune, medium_model


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * ALIGN + 17), max_size=12),
       stages=st.integers(1, 3), direct=st.booleans(), seed=st.integers(0, 255))
def test_the_file_holds_the_pieces_in_order(tmp_path_factory, sizes, stages, direct, seed):
    path = tmp_path_factory.mktemp("direct") / "out.bin"
    pieces = [bytes((seed + i + j) % 251 for j in range(size)) for i, size in enumerate(sizes)]
    out = DirectFile(path, direct=direct, stage_bytes=stages * ALIGN)
    for piece in pieces:
        out.write(piece)
    out.close()
    assert path.read_bytes() == b"".join(pieces)
    assert out.size == sum(sizes)


def test_numpy_pieces_and_an_aligned_end(tmp_path):
    import numpy as np
    data = np.arange(3 * ALIGN, dtype=np.uint16)  # 2 stages of 3 pages exactly
    out = DirectFile(tmp_path / "a.bin", stage_bytes=3 * ALIGN)
    out.write(data[:5])
    out.write(data[5:])
    out.close()
    assert (tmp_path / "a.bin").read_bytes() == data.tobytes()


def test_a_filesystem_refusing_o_direct_gets_the_same_bytes(tmp_path, monkeypatch):
    # Every filesystem on this machine takes O_DIRECT (tmpfs too, on this kernel): a refusal
    # at open, as tmpfs and some network filesystems give, is simulated.
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform: every write goes through the page cache")
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refusing)
    out = DirectFile(tmp_path / "b.bin", stage_bytes=ALIGN)
    assert not out.direct
    out.write(b"abc" * 5000)
    out.close()
    assert (tmp_path / "b.bin").read_bytes() == b"abc" * 5000


@pytest.mark.parametrize("refused_at", [1, 2, 3])
def test_a_filesystem_refusing_direct_writes_midway_keeps_the_order(tmp_path, monkeypatch,
                                                                    refused_at):
    """Some filesystems take O_DIRECT at open and refuse its writes (simulated: every one
    here takes them): what was staged goes first, then every later piece, in order."""
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    real_write, calls = os.write, []

    def refusing(fd, data):
        calls.append(len(data))
        if len(calls) == refused_at:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", refusing)
    pieces = [bytes([i % 251]) * (ALIGN + 7 * i) for i in range(12)]
    out = DirectFile(tmp_path / "m.bin", stage_bytes=2 * ALIGN)
    for piece in pieces:
        out.write(piece)
    assert not out.direct
    out.close()
    assert (tmp_path / "m.bin").read_bytes() == b"".join(pieces)


def test_a_write_limit_mid_stage_is_file_too_large(tmp_path):
    """A limit at an unaligned size cuts a direct write short (the next direct write is then
    refused as unaligned): the writer goes on through the page cache and the error is the
    limit's, EFBIG (real limits, in a child process)."""
    code = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from sparsestitch.core.direct_file import DirectFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_001, 100_001))
        out = DirectFile({str(tmp_path / 'c.bin')!r}, stage_bytes=8192)
        try:
            out.write(b"y" * 300_000)
            out.close()
        except OSError as exc:
            out.abort()
            print(errno.errorcode[exc.errno], out.direct)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["EFBIG", "False"]
    assert (tmp_path / "c.bin").stat().st_size == 100_001


def test_the_setting(monkeypatch):
    monkeypatch.delenv(direct_file.ENVIRONMENT, raising=False)
    assert writes_direct(direct_file.DIRECT_MIN_BYTES)
    assert not writes_direct(direct_file.DIRECT_MIN_BYTES - 1)
    monkeypatch.setenv(direct_file.ENVIRONMENT, "0")
    assert writes_direct(1)
    monkeypatch.setenv(direct_file.ENVIRONMENT, str(1 << 60))
    assert not writes_direct(1 << 40)
    monkeypatch.setenv(direct_file.ENVIRONMENT, "64MiB")
    assert writes_direct(64 << 20) and not writes_direct((64 << 20) - 1)
    for wrong in ("lots", "-5", "2EB"):
        monkeypatch.setenv(direct_file.ENVIRONMENT, wrong)
        with pytest.raises(OptionError, match=direct_file.ENVIRONMENT):
            writes_direct(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("direct-inputs")
    model = medium_model()
    base = save_checkpoint(folder / "base", model, shards=2)
    tunes = [save_checkpoint(folder / f"ft{i}", medium_finetune(model, i), shards=2)
             for i in (1, 2)]
    return base, tunes


def outputs(folder, base, tunes) -> dict:
    deltas = [folder / "ft1.delta", folder / "ft2.delta"]
    sparsestitch.compress(base, tunes, deltas)
    sparsestitch.compress(base, tunes[0], folder / "lossless.delta", lossless=True)
    sparsestitch.restore(base, deltas[0], folder / "restored")
    sparsestitch.stitch(base, deltas, folder / "stitched.safetensors")
    sparsestitch.merge(base, tunes, folder / "merged", rule="task-arithmetic")
    return {name: tree_digest(folder / name) for name in (
        "ft1.delta", "ft2.delta", "lossless.delta", "restored", "stitched.safetensors", "merged")}


def test_every_command_writes_the_same_bytes_direct(inputs, tmp_path, monkeypatch):
    base, tunes = inputs
    monkeypatch.setenv(direct_file.ENVIRONMENT, str(1 << 60))
    (tmp_path / "cached").mkdir()
    cached = outputs(tmp_path / "cached", base, tunes)
    monkeypatch.setenv(direct_file.ENVIRONMENT, "0")
    (tmp_path / "direct").mkdir()
    assert outputs(tmp_path / "direct", base, tunes) == cached
    sparsestitch.verify(tmp_path / "direct" / "lossless.delta", base=base)


@pytest.mark.parametrize("copy", ["kernel", "refused at once", "refused midway"])
def test_a_delta_copied_from_its_spool_by_the_kernel_or_not_is_the_same(inputs, tmp_path,
                                                                        monkeypatch, copy):
    """A delta below the direct size is copied from its spool by copy_file_range; where
    the filesystems refuse it (simulated: EXDEV, at once or after a first part) the rest
    goes through a read and write loop: the same bytes."""
    base, tunes = inputs
    monkeypatch.setenv(direct_file.ENVIRONMENT, str(1 << 60))
    sparsestitch.compress(base, tunes[0], tmp_path / "kernel.delta", lossless=True)
    if copy != "kernel" and hasattr(os, "copy_file_range"):
        real, calls = os.copy_file_range, []

        def refusing(src, dst, count, offset_src=None, *rest):
            calls.append(count)
            if copy == "refused at once" or len(calls) > 1:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, min(count, 1000), offset_src, *rest)
        monkeypatch.setattr(os, "copy_file_range", refusing)
    sparsestitch.compress(base, tunes[0], tmp_path / "other.delta", lossless=True)
    assert (tmp_path / "other.delta").read_bytes() == (tmp_path / "kernel.delta").read_bytes()
    sparsestitch.verify(tmp_path / "other.delta", base=base)


@pytest.mark.parametrize("command", ["compress", "restore"])
def test_a_write_limit_with_direct_writes_is_the_users_error(inputs, tmp_path, command):
    exe = os.path.join(os.path.dirname(sys.executable), "sparsestitch")
    if not os.path.exists(exe):
        pytest.skip("the sparsestitch command is not installed")
    base, tunes = inputs
    delta = tmp_path / "in.delta"
    sparsestitch.compress(base, tunes[0], delta, density=0.5)
    out = tmp_path / ("c.delta" if command == "compress" else "r")
    args = ([command, str(base), str(tunes[0]), "-o", str(out), "--lossless"]
            if command == "compress" else [command, str(base), str(delta), "-o", str(out)])

    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_001, 100_001))
    done = subprocess.run([exe, *args, "--quiet"], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120,
                          env=dict(os.environ, **{direct_file.ENVIRONMENT: "0"}))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: file {str(out)!r}: writing failed (File too large); nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.delta"]
