"""Host arrays to a torch device and back through reused staging buffers.

Allocating pinned memory costs far more than copying into it (``pin_memory()`` per block
was the old device path), so :class:`Staging` keeps a small ring of host buffers, grown
when an array does not fit and never shrunk, and copies each array through the next one:

* on CUDA the buffers are pinned, the host-to-device copy is issued on a separate copy
  stream without blocking (the host goes on filling the next buffer while the previous
  copy runs), the compute stream waits for it with an event, and a buffer is refilled only
  once the event of its last copy has passed;
* on the CPU device the same code runs with ordinary memory (the copies complete at once),
  which is how the tests exercise it without a GPU.

Two buffers (the default) are enough for the copy of one array to overlap the filling of the
next; they hold up to twice the largest array moved (a row block of the base, or a record's
positions), outside the stitcher's ``max_memory``.

Results come back the same way (:meth:`Staging.to_host`): into a reused (pinned) buffer,
then into the caller's array.  A caller that writes the result to disk needs the bits, so
that copy ends with the one synchronisation the merge needs.
"""

from __future__ import annotations

import numpy as np

from ..core.torch_bits import signed_view, torch_type


class Staging:
    """A ring of ``slots`` reused host buffers for copies to and from ``device``."""

    def __init__(self, device, slots: int = 2):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._buffers: list = [None] * slots   # uint8 host tensors
        self._done: list = [None] * slots      # CUDA event of each buffer's last copy
        self._next = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.allocations = 0                   # buffers allocated so far (tests check reuse)

    def _buffer(self, nbytes: int):
        """The next buffer of the ring, at least ``nbytes`` long, free to overwrite."""
        import torch

        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._done[slot] is not None:
            self._done[slot].synchronize()  # its last copy has left it
            self._done[slot] = None
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            # Grown to a power of two, so slowly growing blocks do not reallocate each time.
            size = 1 << max(12, (nbytes - 1).bit_length())
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            self._buffers[slot] = buffer
            self.allocations += 1
        return slot, buffer

    def to_device(self, array: np.ndarray):
        """A device tensor holding ``array`` (unsigned bits as the signed type of their width);
        on CUDA the copy may still be running: the current stream waits for it."""
        import torch

        host = signed_view(array)
        nbytes = host.nbytes
        kind = torch_type(host.dtype)
        out = torch.empty(host.shape, dtype=kind, device=self.device)
        if nbytes == 0:
            return out
        slot, buffer = self._buffer(nbytes)
        # Through numpy: the source may be read-only memory (torch will not wrap that).
        buffer[:nbytes].numpy()[:] = host.reshape(-1).view(np.uint8)
        staged = buffer[:nbytes].view(kind).reshape(host.shape)
        if not self.cuda:
            out.copy_(staged)
            return out
        # ``out`` may reuse memory that work queued on the current stream still reads.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            out.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        torch.cuda.current_stream(self.device).wait_event(done)
        self._done[slot] = done
        return out

    def to_host(self, tensor, out: np.ndarray) -> None:
        """Copy device ``tensor`` into host array ``out`` (same bytes) through a buffer."""
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return
        slot, buffer = self._buffer(nbytes)
        staged = buffer[:nbytes].view(tensor.dtype)
        staged.copy_(tensor.reshape(-1), non_blocking=self.cuda)
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()
        out.reshape(-1).view(np.uint8)[:] = buffer[:nbytes].numpy()
