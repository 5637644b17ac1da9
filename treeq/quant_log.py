"""The per-module table printed while quantizing and saved as quant_log.csv next to the checkpoint."""

from __future__ import annotations

import csv
import resource
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

LOG_NAME = "quant_log.csv"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class ModuleRecord:
    layer: int
    module: str
    in_features: int
    out_features: int
    loss: float
    samples: int
    seconds: float
    peak_mem_mb: float
    fallback: str = ""  # the method used instead when the module saw too few calibration tokens


_HEADER = (
    f"{'layer':>5} {'module':<26} {'in':>6} {'out':>6} {'loss':>11} {'samples':>8} {'sec':>6} {'peak MB':>8} fallback"
)


def format_record(r: ModuleRecord) -> str:
    return (
        f"{r.layer:>5} {r.module:<26} {r.in_features:>6} {r.out_features:>6} {r.loss:>11.4e} "
        f"{r.samples:>8} {r.seconds:>6.2f} {r.peak_mem_mb:>8.0f} {r.fallback}"
    )


class QuantLog:
    def __init__(self, echo=print):
        self.records: list[ModuleRecord] = []
        self.echo = echo

    def add(self, record: ModuleRecord) -> None:
        if not self.records:
            self.echo(_HEADER)
        self.records.append(record)
        self.echo(format_record(record))

    def save(self, directory: Path) -> None:
        with open(Path(directory) / LOG_NAME, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(ModuleRecord)])
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.records)
