"""The per-module table printed while quantizing and saved as quant_log.csv next to the checkpoint."""

from __future__ import annotations

import csv
import logging
import resource
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

LOG_NAME = "quant_log.csv"
RUN_LOG_NAME = "quantize.log"


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
    extras: str = ""  # what the module's weight extras hold (treeq.extras), e.g. its outlier share
    # LLM.int8()'s decomposition: the share of input columns above the outlier threshold in some
    # calibration token (those a forward over the whole calibration set would pass in fp).
    fp_input_share: float | None = None


_HEADER = (
    f"{'layer':>5} {'module':<26} {'in':>6} {'out':>6} {'loss':>11} {'samples':>8} {'sec':>6} {'peak MB':>8} "
    "fallback / extras / fp inputs"
)


def _fp_inputs(r: ModuleRecord) -> str:
    return "" if r.fp_input_share is None else f"fp inputs {100 * r.fp_input_share:.2f}%"


def format_record(r: ModuleRecord) -> str:
    notes = " ".join(filter(None, (r.fallback, r.extras, _fp_inputs(r))))
    return (
        f"{r.layer:>5} {r.module:<26} {r.in_features:>6} {r.out_features:>6} {r.loss:>11.4e} "
        f"{r.samples:>8} {r.seconds:>6.2f} {r.peak_mem_mb:>8.0f} {notes}"
    )


class QuantLog:
    """The per-module table, and every line of the run (the table, and treeq's log messages while
    it runs: see :meth:`capturing`), written as quant_log.csv and quantize.log."""

    def __init__(self, echo=print):
        self.records: list[ModuleRecord] = []
        self.lines: list[str] = []
        self.echo = echo

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.echo(line)

    def add(self, record: ModuleRecord) -> None:
        if not self.records:
            self.say(_HEADER)
        self.records.append(record)
        self.say(format_record(record))

    @contextmanager
    def capturing(self):
        """treeq's log messages (warnings such as a retried Cholesky) join the run's lines."""
        log = self

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

        handler, logger = Keep(logging.INFO), logging.getLogger("treeq")
        logger.addHandler(handler)
        try:
            yield self
        finally:
            logger.removeHandler(handler)

    def save(self, directory: Path) -> None:
        (Path(directory) / RUN_LOG_NAME).write_text("".join(f"{line}\n" for line in self.lines))
        with open(Path(directory) / LOG_NAME, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(ModuleRecord)])
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.records)
