"""Packed trials: K compatible trials trained as one fused model per process (`train_pack`).

Which trials can share a pack is `fasweep.packing` (torch-free, beside the spec); `net` is the fused model; `optim`
the members' optimizers as one stacked update; `train` `train_pack`: the members through `fasweep.train`'s one loop.
"""

__all__ = ["train_pack"]


def __getattr__(name: str) -> object:
    if name == "train_pack":  # torch only when training: the spec and the launcher group trials without it
        from fasweep.packed.train import train_pack

        return train_pack
    raise AttributeError(name)
