""" Input batches on the training device: layout conversion that is safe with timm's prefetcher """
import torch

__all__ = ['prepare_batch']


def prepare_batch(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The batch as the model takes it (``channels_last`` copy if asked), safe to free the loader's tensor.

    timm's ``PrefetchLoader`` (up to 1.0.29) allocates each batch on its side stream without waiting for the
    consumer stream, so a batch freed while kernels queued on the current stream still read it (e.g. when
    ``input`` is rebound to its channels_last copy) can be overwritten by the next prefetched batch. On CUDA the
    batch is marked as used by the current stream (``record_stream``): its memory is only reused once the work queued
    so far has finished. A no-op on other devices.
    """
    if x.is_cuda:
        x.record_stream(torch.cuda.current_stream(x.device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
