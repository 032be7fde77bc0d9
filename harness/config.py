"""The configuration schema: dataclasses registered in Hydra's ConfigStore.

The YAML files in ``conf/`` are presets over this schema. Every field has a one-line comment; each
section validates itself in ``__post_init__`` and names the offending key, so a bad value fails at
start, before any process is launched. This module imports nothing else from the harness.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import io
import signal
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, restart me"
CONFIG_ERROR_EXIT_CODE = 2  # invalid configuration (the usage-error code of command-line tools)
BEST_MODES = ("min", "max")
SPOT_PROVIDERS = ("aws", "gcp", "azure")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


@dataclass
class TrainerConfig:
    max_steps: int = 300  # total optimizer steps of the run (resumed runs continue up to it)
    seed: int = 0  # seeds model init, data order and every rank's RNG
    log_every: int = 25  # steps between progress lines when stdout is not a terminal
    num_threads: Optional[int] = None  # torch threads per rank; null: CPU cores / ranks on the node
    collective_timeout_s: int = 1800  # how long ranks wait in a collective (e.g. for rank 0's save)
    metrics_file: Optional[str] = None  # JSON lines of per-step loss from rank 0; null: <dir>/metrics.jsonl
    accumulate: int = 1  # micro-batches per optimizer step (task.batch_size is the micro-batch per rank)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on the rank's device, FSDP2's MixedPrecisionPolicy under fsdp; fp16 adds a GradScaler)
    clip_grad_norm: Optional[float] = None  # max gradient norm, or null (unscaled first under fp16)
    eval_every: int = 0  # steps between evaluations on task.eval_data (logged as val_loss); 0: off
    ema_decay: Optional[float] = None  # keep an exponential moving average of the weights; null: off
    eval_ema: bool = False  # with ema_decay and eval_every: also evaluate the EMA's weights (logged as val_loss_ema)
    strategy: str = "ddp"  # ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, gradients and optimizer state sharded over ranks)
    fsdp_shard: List[str] = field(default_factory=list)  # fsdp: class names of the blocks sharded one by one (e.g. [GPT2Block]); empty: each element of the model's nn.ModuleLists

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "trainer.max_steps", self.max_steps, "an integer >= 1")
        _require(self.seed >= 0, "trainer.seed", self.seed, "an integer >= 0")
        _require(self.log_every >= 1, "trainer.log_every", self.log_every, "an integer >= 1")
        _require(self.num_threads is None or self.num_threads >= 1, "trainer.num_threads",
                 self.num_threads, "null or an integer >= 1")
        _require(self.collective_timeout_s >= 1, "trainer.collective_timeout_s",
                 self.collective_timeout_s, "seconds >= 1")
        _require(self.accumulate >= 1, "trainer.accumulate", self.accumulate, "an integer >= 1")
        _require(self.precision in PRECISIONS, "trainer.precision", self.precision, " | ".join(PRECISIONS))
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "trainer.clip_grad_norm",
                 self.clip_grad_norm, "null or a norm > 0")
        _require(self.eval_every >= 0, "trainer.eval_every", self.eval_every, "an integer >= 0")
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "trainer.ema_decay", self.ema_decay,
                 "null or a decay in (0, 1)")
        if self.eval_ema and (self.ema_decay is None or not self.eval_every):
            raise ConfigError("trainer.eval_ema=true evaluates the EMA at each evaluation: HINT: set "
                              "trainer.ema_decay and trainer.eval_every too, or drop trainer.eval_ema")
        _require(self.strategy in STRATEGIES, "trainer.strategy", self.strategy, " | ".join(STRATEGIES))
        _require(all(isinstance(name, str) and name.isidentifier() for name in self.fsdp_shard),
                 "trainer.fsdp_shard", self.fsdp_shard, "a list of class names such as [GPT2Block]")
        if self.fsdp_shard and self.strategy != "fsdp":
            raise ConfigError(f"trainer.fsdp_shard={list(self.fsdp_shard)} applies to trainer.strategy=fsdp "
                              f"only, not {self.strategy}: HINT: add trainer.strategy=fsdp or drop trainer.fsdp_shard")

@dataclass
class CheckpointConfig:
    dir: str = "checkpoints/${name}"  # the run's checkpoint folder (path or fsspec URL); stable across relaunches
    every_steps: int = 100  # save every N steps (and always at the last step)
    keep_last: int = 3  # keep the newest K checkpoints; 0 keeps all
    keep_every: int = 0  # also keep, forever, checkpoints whose step is a multiple of N; 0: off
    keep_best: int = 0  # also keep the best K by best_metric; 0: off
    best_metric: Optional[str] = None  # name of a logged metric that ranks checkpoints for keep_best
    best_mode: str = "min"  # "min" or "max": which end of best_metric is best
    resume: bool = True  # resume from the newest checkpoint in dir; false: start fresh (first launch only: restarts and requeues always resume)
    set_aside: bool = False  # with resume=false: move an earlier run's files in dir to dir/set_aside/<UTC time>/ (else refuse to start)
    verify: bool = True  # check a checkpoint's checksum (XXH3) against its manifest before loading it
    unsafe_load: bool = False  # allow full unpickling (runs code from the file!); only for files you trust
    init_from: Optional[str] = None  # pretrained weights for a fresh run (model only; ignored on resume)
    init_rename: Dict[str, str] = field(default_factory=dict)  # prefix renames for init_from: {old.: new.}
    init_strict: bool = False  # fail when init_from has missing, unexpected or mis-shaped keys
    async_save: bool = False  # snapshot to host memory, then write in a background thread
    staging_dir: Optional[str] = None  # write checkpoints here first (local, fast), upload to dir behind

    def __post_init__(self) -> None:
        _require(bool(self.dir), "checkpoint.dir", self.dir, "a non-empty path or URL")
        _require(self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, "an integer >= 1")
        _require(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "an integer >= 0 (0 keeps all)")
        _require(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every, "an integer >= 0")
        _require(self.keep_best >= 0, "checkpoint.keep_best", self.keep_best, "an integer >= 0")
        _require(self.best_mode in BEST_MODES, "checkpoint.best_mode", self.best_mode, "'min' or 'max'")
        if self.keep_best and not self.best_metric:
            raise ConfigError(
                f"checkpoint.keep_best={self.keep_best} needs checkpoint.best_metric: "
                "HINT: set checkpoint.best_metric=<name of a value passed to session.log()>")


def _require_package(enabled: bool, key: str, module: str, extra: str) -> None:
    """An optional sink is checked at start (every rank, and the launcher before it starts any), not
    when rank 0 first writes. find_spec looks the package up without importing it."""
    if enabled and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}=true needs the {module} package, which is not installed: "
                          f"HINT: pip install 'harness[{extra}]' (or set {key}=false)")


@dataclass
class LogConfig:
    """Where the values passed to ``session.log()`` go besides the progress line and
    ``trainer.metrics_file``; written by rank 0, one run across restarts and requeues."""

    tensorboard: bool = False  # write TensorBoard scalars (pip install 'harness[tensorboard]')
    tensorboard_dir: Optional[str] = None  # local folder of the one TensorBoard run; null: <checkpoint.dir>/tensorboard
    wandb: bool = False  # log to Weights & Biases (pip install 'harness[wandb]'); one W&B run per checkpoint.dir
    wandb_project: Optional[str] = None  # W&B project; null: WANDB_PROJECT or W&B's default
    wandb_entity: Optional[str] = None  # W&B team or user; null: your default entity
    wandb_dir: Optional[str] = None  # local folder for W&B's files (it adds wandb/); null: checkpoint.dir
    wandb_mode: Optional[str] = None  # online | offline (sync later: wandb sync) | disabled; null: WANDB_MODE or online

    def __post_init__(self) -> None:
        _require(self.wandb_mode is None or self.wandb_mode in WANDB_MODES, "log.wandb_mode", self.wandb_mode,
                 f"null or one of {WANDB_MODES}")
        _require_package(self.tensorboard, "log.tensorboard", "tensorboard", "tensorboard")
        _require_package(self.wandb, "log.wandb", "wandb", "wandb")


@dataclass
class PreemptConfig:
    signals: List[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"])  # signals that mean "save and stop"
    check_every: int = 0  # steps between cross-rank agreements (one tiny all-reduce); 0: auto (<1% of step time, <=0.25 s apart)
    grace_s: float = 30.0  # seconds between the signal and a hard kill (k8s/GCP 30, AWS spot 120)
    spot: Optional[str] = None  # poll a cloud termination notice: "aws", "gcp" or null
    spot_url: Optional[str] = None  # notice endpoint; null: the provider's metadata URL
    spot_poll_s: float = 5.0  # seconds between notice polls

    def __post_init__(self) -> None:
        for name in self.signals:
            _require(isinstance(getattr(signal, str(name), None), signal.Signals),
                     "preempt.signals", name, "signal names such as SIGTERM or SIGUSR1")
        _require(self.check_every >= 0, "preempt.check_every", self.check_every, "0 (auto) or an integer >= 1")
        _require(self.grace_s > 0, "preempt.grace_s", self.grace_s, "seconds > 0")
        _require(self.spot is None or self.spot in SPOT_PROVIDERS, "preempt.spot", self.spot,
                 f"null or one of {SPOT_PROVIDERS}")
        _require(self.spot_poll_s > 0, "preempt.spot_poll_s", self.spot_poll_s, "seconds > 0")


@dataclass
class TaskConfig:
    model: Any = MISSING  # _target_ of an nn.Module and its arguments
    optimizer: Any = MISSING  # _target_ of an optimizer, with _partial_: true (params come later)
    scheduler: Any = None  # _target_ of an LR scheduler with _partial_: true, or null
    data: Any = MISSING  # _target_ of a map-style Dataset
    loss: str = MISSING  # dotted path of loss_fn(model, batch) -> scalar loss tensor
    batch_size: int = 32  # samples per rank per step
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle: bool = True  # reshuffle the data every epoch (DistributedSampler)
    meta_init: bool = False  # on resume, skip random init (meta device); only if every buffer is persistent
    eval_data: Any = None  # _target_ of a map-style Dataset for trainer.eval_every, or null
    eval_batch_size: Optional[int] = None  # samples per rank per evaluation batch; null: batch_size

    def __post_init__(self) -> None:
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1, "task.eval_batch_size",
                 self.eval_batch_size, "null or an integer >= 1")
        _require(self.batch_size >= 1, "task.batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_workers >= 0, "task.num_workers", self.num_workers, "an integer >= 0")
        for key in ("model", "optimizer", "data"):
            value = getattr(self, key)
            _require(isinstance(value, dict) and "_target_" in value, f"task.{key}", value,
                     "a mapping with a _target_")


@dataclass
class LocalLauncherConfig:
    backend: str = "local"  # runs N worker processes on this machine
    nproc_per_node: Optional[int] = None  # workers; null: one per GPU, or 2 gloo processes without GPU
    max_restarts: int = 0  # relaunch the job up to N times when it exits "preempted" (75)
    master_addr: str = "127.0.0.1"  # rendezvous address of rank 0

    def __post_init__(self) -> None:
        _require(self.nproc_per_node is None or self.nproc_per_node >= 1, "launcher.nproc_per_node",
                 self.nproc_per_node, "null (auto) or an integer >= 1")
        _require(self.max_restarts >= 0, "launcher.max_restarts", self.max_restarts, "an integer >= 0")


@dataclass
class DirectLauncherConfig:
    backend: str = "direct"  # run in this process; ranks come from torchrun or srun variables


@dataclass
class SlurmLauncherConfig:
    backend: str = "slurm"  # submit through submitit
    nodes: int = 1  # nodes of the job
    nproc_per_node: int = 1  # tasks (ranks) per node; one per GPU
    gpus_per_node: int = 0  # GPUs per node (--gpus-per-node)
    cpus_per_task: int = 1  # CPUs per task
    mem_gb: Optional[int] = None  # memory per node in GB; null: the partition's default
    timeout_min: int = 60  # job time limit in minutes
    partition: Optional[str] = None  # partition; null: the cluster's default
    account: Optional[str] = None  # account to charge
    qos: Optional[str] = None  # quality of service
    constraint: Optional[str] = None  # node features (--constraint)
    signal_delay_s: int = 120  # lead time of the warning signal (USR2, to every task) before the time limit
    max_timeout_requeues: int = 3  # requeues allowed after time-outs (preemptions are unlimited)
    folder: str = "${checkpoint.dir}/slurm"  # where submitit keeps logs and job pickles (stable)
    additional: Dict[str, Any] = field(default_factory=dict)  # extra sbatch options {name: value}
    follow: bool = False  # wait and print the job's state until it ends

    def __post_init__(self) -> None:
        for key in ("nodes", "nproc_per_node", "cpus_per_task", "timeout_min"):
            value = getattr(self, key)
            _require(value >= 1, f"launcher.{key}", value, "an integer >= 1")
        _require(self.gpus_per_node >= 0, "launcher.gpus_per_node", self.gpus_per_node, "an integer >= 0")
        _require(self.signal_delay_s >= 1, "launcher.signal_delay_s", self.signal_delay_s, "seconds >= 1")
        _require(self.max_timeout_requeues >= 0, "launcher.max_timeout_requeues",
                 self.max_timeout_requeues, "an integer >= 0")
        for name, value in self.additional.items():
            _require(not _has_control(str(name)) and not _has_control(str(value)),
                     f"launcher.additional.{name}", value, "a value without newlines or control characters")


LAUNCHERS = {"local": LocalLauncherConfig, "direct": DirectLauncherConfig, "slurm": SlurmLauncherConfig}


@dataclass
class HarnessConfig:
    name: str = "example"  # the run's identity: its checkpoint folder and SLURM job name derive from it
    launcher: Any = MISSING  # how ranks are started: launcher=local | direct | slurm
    task: Optional[TaskConfig] = None  # what the built-in loop trains: task=example, or your own preset
    script: Optional[str] = None  # run YOUR training script on every rank instead of the built-in loop
    script_args: List[str] = field(default_factory=list)  # its command-line arguments (sys.argv[1:])
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name and not _has_control(self.name), "name",
                 self.name, "a non-empty run name without '/' or control characters")
        if self.task is not None and self.trainer.eval_every:
            _require(self.task.eval_data is not None, "task.eval_data", None,
                     "a dataset _target_ when trainer.eval_every > 0")
        _require(isinstance(self.launcher, tuple(LAUNCHERS.values())), "launcher", self.launcher,
                 f"one of launcher={'|'.join(LAUNCHERS)}")
        # TensorBoard and W&B write through local files; a remote checkpoint.dir needs a local folder.
        for enabled, key, folder in ((self.log.tensorboard, "log.tensorboard_dir", self.log.tensorboard_dir),
                                     (self.log.wandb, "log.wandb_dir", self.log.wandb_dir)):
            if enabled and folder is None and "://" in self.checkpoint.dir:
                raise ConfigError(f"{key}=null would put files in checkpoint.dir={self.checkpoint.dir}, a "
                                  f"remote URL: HINT: set {key} to a local folder that every restart sees")
        if self.trainer.strategy == "fsdp":
            self._check_fsdp_checkpoints()

    def _check_fsdp_checkpoints(self) -> None:
        """Sharded checkpoints are written by every rank into a local (or shared) folder, synchronously;
        what they cannot do yet is refused at start, naming the key."""
        ckpt = self.checkpoint
        unsupported = [(ckpt.async_save, "checkpoint.async_save=true", "drop it (fsdp saves synchronously)"),
                       # DCP writes each rank's shards to a local path: a remote folder is reached
                       # through a staging folder, from which each rank uploads its own shards.
                       ("://" in ckpt.dir and not ckpt.dir.startswith("file://") and not ckpt.staging_dir,
                        f"checkpoint.dir={ckpt.dir} without checkpoint.staging_dir",
                        "add checkpoint.staging_dir=<a node-local folder> (each rank writes its shards there "
                        "and uploads them itself), or use a local or shared filesystem path")]
        for used, key, fix in unsupported:
            if used:
                raise ConfigError(f"{key} is not supported with trainer.strategy=fsdp yet: HINT: {fix}")


PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")  # harness.strategy: how the model is wrapped and its state saved


def _has_control(text: str) -> bool:
    """Newlines and other control characters would inject lines into generated sbatch scripts."""
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


HELP_APP_NAME = "harness.launch"


def register_configs(help_template: str = "$FLAGS_HELP") -> None:
    """Register the schema so conf/*.yaml presets are checked against it, and ``--help``'s text
    (``hydra/help: harness`` in conf/config.yaml; the launcher passes the text generated from this
    schema, already escaped for Hydra)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="hydra/help", name="harness",
                node={"app_name": HELP_APP_NAME, "header": "", "footer": "", "template": help_template})
    store.store(name="harness_schema", node=HarnessConfig)
    for name, schema in LAUNCHERS.items():
        store.store(group="launcher", name=f"{name}_schema", node=schema)
    store.store(group="task", name="task_schema", node=TaskConfig)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as builtins (safe for weights_only checkpoints and for pickling)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def validate(data: dict | DictConfig) -> HarnessConfig:
    """Build and validate the typed config from plain data (e.g. sent to a worker).

    Raises ConfigError (or OmegaConf's ValidationError, which names the key) on bad values.
    """
    plain = to_plain(data) if isinstance(data, DictConfig) else dict(data)
    launcher = dict(plain.get("launcher") or {})
    backend = launcher.get("backend", "local")
    if backend not in LAUNCHERS:
        raise ConfigError(f"launcher.backend={backend!r} is invalid: expected one of {list(LAUNCHERS)}")
    schema = OmegaConf.structured(HarnessConfig)
    schema.launcher = OmegaConf.structured(LAUNCHERS[backend])
    merged = OmegaConf.merge(schema, plain)
    return OmegaConf.to_object(merged)


@dataclass(frozen=True)
class SchemaKey:
    """One key a user can set, read from the schema (what ``--help`` lists and typos are matched to)."""

    key: str  # dotted, e.g. "trainer.max_steps"
    default: str  # as written on a command line ("null", "[]", "???" when a preset must give it)
    comment: str  # the field's comment in this module
    launcher: Optional[str] = None  # the launcher=... preset that has this key; None: every run


def schema_keys() -> list[SchemaKey]:
    """Every settable key, in schema order: the top-level keys and sections, then each launcher's.

    Generated from the dataclasses (names, defaults, and the one-line comment each field carries), so
    ``--help`` cannot drift from the schema. Mappings the presets fill in (``task.model``, ...) are one
    key each: their contents are free-form.
    """
    keys: list[SchemaKey] = []
    for name, launcher_cls in LAUNCHERS.items():
        keys += _section_keys(launcher_cls, "launcher.", launcher=name, skip=("backend",))
    return _section_keys(HarnessConfig, "") + keys


def _section_keys(cls: type, prefix: str, launcher: Optional[str] = None, skip: tuple = ()) -> list[SchemaKey]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    keys: list[SchemaKey] = []
    for item in dataclasses.fields(cls):
        if item.name in skip or (cls is HarnessConfig and item.name == "launcher"):
            continue  # the launcher's keys are listed per preset
        nested = _dataclass_in(hints[item.name])
        if nested is not None:
            keys += _section_keys(nested, f"{prefix}{item.name}.", launcher)
            continue
        keys.append(SchemaKey(f"{prefix}{item.name}", _render_default(item), comments.get(item.name, ""),
                              launcher))
    return keys


def _dataclass_in(hint: Any) -> Optional[type]:
    """The dataclass a field holds (also inside Optional[...]), or None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _render_default(item: dataclasses.Field) -> str:
    if item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return _as_override(item.default_factory())  # type: ignore[misc]
    return _as_override(item.default)


def _as_override(value: Any) -> str:
    """A value as it is written in a Hydra override (``null``, ``true``, ``[a,b]``, ``???``: required)."""
    if value is MISSING or value is dataclasses.MISSING:
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_as_override, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_as_override(item)}" for key, item in value.items()) + "}"
    return str(value)


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment at the end of its line} from this module's source (the schema's docs)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: keys and defaults are still listed
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    return {node.target.id: comments.get(node.end_lineno or node.lineno, "")
            for node in ast.parse(source).body[0].body  # type: ignore[attr-defined]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
