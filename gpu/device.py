"""The CUDA side of the GPU engine's plumbing, with CuPy: device choice, streams, pinned buffers, copies.

``CupyDevice`` implements the device interface of ``gpu/transport.py`` (``HostDevice`` documents it) for
one rank: the rank's compute stream is whatever stream is current on its thread (the engine makes its own
stream current), and copies to and from pinned host mirrors run on a separate copy stream, ordered after
the compute stream's work by an event.
"""

import ctypes

import cupy
import numpy as np


def select_device(mpi_comm):
    """Pick this MPI rank's GPU: node-local rank (``Split_type(COMM_TYPE_SHARED)``) modulo the GPUs seen.

    Several ranks may share one GPU. Returns (device id, local rank, local size).
    """
    MPI = mpi_comm.MPI
    local = mpi_comm.comm.Split_type(MPI.COMM_TYPE_SHARED, mpi_comm.rank)
    rank, size = local.Get_rank(), local.Get_size()
    local.Free()
    device = rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device, rank, size


class CupyDevice:
    """Device operations for one rank's transport; create it on the rank's thread, after its stream."""

    def __init__(self):
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)

    @staticmethod
    def pointer(buf):
        return buf.data.ptr

    @staticmethod
    def pinned(nbytes):
        return np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)

    def _after_compute(self):
        ready = cupy.cuda.get_current_stream().record()
        self.copy_stream.wait_event(ready)

    def to_host(self, dst, src):
        self._after_compute()
        src.data.copy_to_host_async(dst.ctypes.data_as(ctypes.c_void_p), src.nbytes, self.copy_stream)
        return self.copy_stream.record()

    def to_device(self, dst, src):
        self._after_compute()
        dst.data.copy_from_host_async(src.ctypes.data_as(ctypes.c_void_p), dst.nbytes, self.copy_stream)
        return self.copy_stream.record()

    @staticmethod
    def done(event):
        return event.done

    @staticmethod
    def wait(event):
        event.synchronize()

    @staticmethod
    def sync():
        cupy.cuda.get_current_stream().synchronize()

    @staticmethod
    def copy(dst, src):
        """Device to device on the calling thread's stream, complete when it returns."""
        stream = cupy.cuda.get_current_stream()
        dst.data.copy_from_device_async(src.data, src.nbytes, stream)
        stream.synchronize()


def sim_world(size, timeout=600.0):
    """A ``SimWorld`` whose ranks exchange device arrays on this GPU, each copy complete when posted."""
    from refimpl.comm.sim import SimWorld
    return SimWorld(size, timeout, array_type=cupy.ndarray, copy=CupyDevice.copy)
