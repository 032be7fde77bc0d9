"""Where a step's logged values go besides the progress line: the metrics file, TensorBoard, W&B.

``ProgressReporter`` reads the values of pending steps (one device sync per progress line, not per
step) and hands the same rows to every sink; a sink that fails is dropped with one warning and
training goes on. Only rank 0 has sinks. TensorBoard and W&B are optional extras, imported only when
``log.tensorboard`` / ``log.wandb`` is on (config validation checks that they are installed).

The contract a sink honours (``Sink``): ``write(rows)`` receives the rows of finished steps in step
order, each ``(step, {name: float})``, at most once per step; ``close()`` flushes and releases it.
Either may raise: the reporter warns and stops using the sink.

Across restarts and requeues each sink keeps ONE run, and a step appears once even when an earlier
launch logged steps after the checkpoint this launch resumed from (it died between checkpoints):
the metrics file drops the earlier launch's rows past the resumed step when it is opened, TensorBoard
purges them (``purge_step``), W&B keeps the earlier ones (see ``WandbSink``). The values are equal
either way, because the resume is bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Callable, Optional, Protocol, Sequence

from harness.config import HarnessConfig

log = logging.getLogger("harness")

Row = tuple[int, dict[str, float]]  # (step, {name: value}) of one finished step

TENSORBOARD_DIR = "tensorboard"  # under checkpoint.dir unless log.tensorboard_dir says otherwise
WANDB_RUN_ID_FILE = "wandb_run_id"  # in checkpoint.dir: the W&B run every launch of this run continues


class Sink(Protocol):
    name: str  # what the warning calls it, e.g. "the metrics file /path/metrics.jsonl"

    def write(self, rows: Sequence[Row]) -> None: ...

    def close(self) -> None: ...


class MetricsFile:
    """JSON lines ``{"step": N, name: value, ...}``, appended, each step once across resumes.

    A launch that resumed at step N opens the file with ``resumed_step=N``: rows of steps past N (an
    earlier launch logged them after its last checkpoint and died) are dropped first, as
    TensorBoard's ``purge_step`` does, because this launch logs those steps again. A fresh start
    (N = 0) so empties a file earlier launches wrote. Lines that are not rows of ours are kept, except
    an unterminated last line (a write cut short by a kill). The file is rewritten to a temporary
    name and renamed over, so a kill while purging leaves the old file or the new one, never half.
    ``resumed_step=None``: append without looking.
    """

    def __init__(self, path: str, resumed_step: Optional[int] = None):
        self.name = f"the metrics file {path}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resumed_step is not None:
            purge_rows_after(path, resumed_step)
        self._file = open(path, "a", buffering=1)

    def write(self, rows: Sequence[Row]) -> None:
        self._file.write("".join(json.dumps({"step": step, **values}) + "\n" for step, values in rows))

    def close(self) -> None:
        self._file.close()


def purge_rows_after(path: str, step: int) -> int:
    """Drop the rows of steps past ``step`` from the JSON-lines file ``path`` (if it exists), and an
    unterminated last line; returns how many lines were dropped. Rewrites only when one is."""
    try:
        with open(path) as file:
            lines = file.readlines()
    except FileNotFoundError:
        return 0
    kept = [line for line in lines if line.endswith("\n") and not _row_after(line, step)]
    if len(kept) == len(lines):
        return 0
    temp = f"{path}.purge.tmp"
    with open(temp, "w") as file:
        file.writelines(kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    return len(lines) - len(kept)


def _row_after(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:  # not a row of ours (a user's note, a foreign line): not ours to drop
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step


class TensorBoardSink:
    """Scalars in one TensorBoard run folder that every launch of the run appends to.

    A launch that resumed at step N opens its event file with ``purge_step=N + 1``: the file starts
    with a SessionLog START at that step, and TensorBoard, reading the folder's files in order (their
    names start with the creation time), discards every event of the earlier files with a step >= N + 1.
    Steps that an interrupted launch logged after its last checkpoint, and that this launch logs again,
    so appear once. A fresh start (N = 0) hides everything earlier launches logged in the folder.
    """

    def __init__(self, folder: str, resumed_step: int):
        # Needs the tensorboard package (harness[tensorboard]); imported only when enabled.
        from torch.utils.tensorboard import SummaryWriter

        self.name = f"the TensorBoard folder {folder}"
        self._writer = SummaryWriter(log_dir=folder, purge_step=resumed_step + 1)

    def write(self, rows: Sequence[Row]) -> None:
        for step, values in rows:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
        # As current on disk as the metrics file (the reporter calls write() once per progress line or
        # save): a launch killed without a chance to close keeps what it showed, not up to 2 minutes less.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One Weights & Biases run per checkpoint folder: every launch calls ``wandb.init`` with the id
    stored in ``<checkpoint.dir>/wandb_run_id`` and ``resume="allow"``, and logs with ``step=``.

    W&B refuses a step lower than the run's last one (with a warning per step). Online, a resumed run's
    ``run.step`` is past the steps an earlier launch logged, so the steps this launch repeats (logged
    after the checkpoint it resumed from, before the interruption) are skipped here: W&B keeps the
    earlier launch's values for them, which equal this launch's since the resume is bit for bit.
    Offline (``log.wandb_mode=offline``) every launch writes its own ``offline-run-*`` folder with the
    same id; ``wandb sync`` uploads them into that one run.
    """

    def __init__(self, run_id: str, folder: str, cfg: HarnessConfig, config_data: Optional[dict]):
        import wandb  # harness[wandb]; imported only when enabled

        os.makedirs(folder, exist_ok=True)
        self.name = f"the W&B run {run_id}"
        self._run = wandb.init(id=run_id, resume="allow", dir=folder, name=cfg.name,
                               project=cfg.log.wandb_project, entity=cfg.log.wandb_entity,
                               mode=cfg.log.wandb_mode, config=config_data)
        self._first_step = self._run.step  # steps below it are already in the run

    def write(self, rows: Sequence[Row]) -> None:
        for step, values in rows:
            if step >= self._first_step:
                self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


def wandb_run_id(folder: str, renew: bool = False) -> str:
    """The W&B run id of the run whose checkpoint folder is ``folder`` (a path or fsspec URL): the
    one in ``<folder>/wandb_run_id``, else (or with ``renew``) a new random one written there.

    Stored, not derived from the path: a folder moved or mounted elsewhere keeps its run, and a new
    folder with the same ``name`` gets a new one. Write an existing run's id into the file to continue
    that run. Rank 0 only; the file is replaced by rename, so a crash never leaves half an id.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root.rstrip('/')}/{WANDB_RUN_ID_FILE}"
    if not renew:
        try:
            stored = fs.cat_file(path).decode().strip()
        except FileNotFoundError:
            stored = ""
        if stored:
            return stored
    run_id = secrets.token_hex(8)  # W&B ids: up to 64 of [a-z0-9]
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path + ".tmp", (run_id + "\n").encode())
    fs.mv(path + ".tmp", path)
    return run_id


def open_sinks(cfg: HarnessConfig, resumed_step: int, new_run: bool,
               config_data: Optional[dict] = None) -> list[Sink]:
    """Rank 0's optional sinks (TensorBoard, W&B) for a launch that continues after ``resumed_step``
    (0: a fresh start). ``new_run``: this launch starts the run over (``checkpoint.resume=false``), so
    W&B gets a new run id. A sink that cannot be opened (W&B unreachable, a read-only folder) is left
    out with a warning: logging never stops training."""
    sinks: list[Sink] = []
    if cfg.log.tensorboard:
        folder = cfg.log.tensorboard_dir or os.path.join(cfg.checkpoint.dir, TENSORBOARD_DIR)
        _open_or_warn(sinks, f"the TensorBoard folder {folder}", lambda: TensorBoardSink(folder, resumed_step))
    if cfg.log.wandb:
        def open_wandb() -> WandbSink:
            run_id = wandb_run_id(cfg.checkpoint.dir, renew=new_run)
            return WandbSink(run_id, cfg.log.wandb_dir or cfg.checkpoint.dir, cfg, config_data)
        _open_or_warn(sinks, "Weights & Biases", open_wandb)
    return sinks


def open_metrics_file(path: Optional[str], resumed_step: Optional[int] = None) -> list[Sink]:
    """Rank 0's metrics file (``trainer.metrics_file``, or ``<checkpoint.dir>/metrics.jsonl``; None:
    no file) opened at ``resumed_step`` (see MetricsFile), or no sink and a warning when it cannot be opened (a file where its folder should be, a
    read-only folder): like a failed write later, it never stops training, and rank 0 does not
    leave the other ranks waiting for it with a raw OSError."""
    sinks: list[Sink] = []
    if path:
        _open_or_warn(sinks, f"the metrics file {path}", lambda: MetricsFile(path, resumed_step))
    return sinks


def _open_or_warn(sinks: list[Sink], what: str, opener: Callable[[], Sink]) -> None:
    try:
        sinks.append(opener())
    except Exception as error:  # a third-party logger's failure must not stop training: warn, go on
        log.warning("could not open %s (%s: %s); training goes on without it", what, type(error).__name__, error)
