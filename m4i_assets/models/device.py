"""Where the model adapters run: one rule for CLIPs, captioners and attack models."""

import torch


def device_for(preferred: str | None = None) -> torch.device:
    """`cuda` when present (or the device asked for), else `cpu`."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
