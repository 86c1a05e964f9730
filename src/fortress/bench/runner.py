"""Run a benchmark grid, locally or on a Ray cluster, into ``DIR/results.jsonl`` (DESIGN §6).

Every cell of a :class:`~fortress.bench.grid.GridConfig` is one call of :func:`run_cell`, the same
task function under both executors. Victims and defenses are built once per (victim, defense,
params) and cached under ``DIR/artifacts/<key>/`` (builds are seeded, so the cache is exact); a cell
loads them from there. The driver alone appends records, one fsynced line per finished cell, so an
interrupted grid loses nothing it finished, and ``resume=True`` skips every cell whose key is already
in the file.

``executor="ray"`` submits the same function as Ray tasks (artifact builds first, cells depending on
them), starting a local Ray instance unless one is running or an address is given. On a multi-node
cluster ``DIR`` must be on storage every node sees, and fortress must be installed on every node.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fortress.bench.build import BuildContext, build_defense, read_utility_match, training_seed
from fortress.bench.grid import Cell, GridConfig, config_hash, defense_artifact_key, expand_grid, victim_artifact_key
from fortress.bench.records import ResultRecord, append_record, read_records
from fortress.config import VictimConfig, dump_toml, to_dict
from fortress.defenses import Defense, load_defense
from fortress.device import check_device, device_facts, resolve_device
from fortress.errors import ConfigError
from fortress.models.io import atomic_write_text, load_model, read_json

__all__ = [
    "RESULTS",
    "GridProgress",
    "GridRun",
    "ensure_defense",
    "ensure_victim",
    "finished_keys",
    "load_cell_defense",
    "run_cell",
    "run_grid",
]

log = logging.getLogger(__name__)

Executor = Literal["local", "ray"]

RESULTS = "results.jsonl"
ARTIFACTS = "artifacts"
#: Written last into an artifact directory: its presence means the build finished.
BUILT = "built.json"
LOCK = ".grid.lock"


@dataclass(frozen=True)
class GridProgress:
    """Where a grid stands: ``done + running + left == total`` (``failed`` cells count as done).

    Attributes:
        total: cells in the grid.
        done: cells with a record (including those found on resume) or a failure.
        running: cells submitted and not finished.
        left: cells not started.
        failed: cells that raised.
        last: the cell that just finished, if any.
    """

    total: int
    done: int
    running: int
    left: int
    failed: int = 0
    last: str | None = None


@dataclass
class GridRun:
    """What :func:`run_grid` did.

    Attributes:
        out: the run directory.
        total: cells in the grid.
        skipped: cells already finished before this run (``resume``).
        records: records appended by this run, in finishing order.
        failed: ``(cell description, error)`` for each cell that raised.
        wall_s: wall time of this run.
    """

    out: Path
    total: int
    skipped: int
    records: list[ResultRecord] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    wall_s: float = 0.0


# -- artifacts ------------------------------------------------------------------------------------


def ensure_victim(victim: VictimConfig, out: Path, device: str = "cpu", amp: bool = False) -> Path:
    """Train and save the victim once under ``out/artifacts/<key>/`` (on ``device``); return the directory."""
    from fortress.bench.pipeline import train_victim

    d = Path(out) / ARTIFACTS / victim_artifact_key(victim)
    if not (d / BUILT).is_file():
        log.info("building victim %s", d.name)
        _, acc = train_victim(victim, d, device=device, amp=amp)
        meta: dict[str, Any] = {"kind": "victim", "config": to_dict(victim), "test_acc": acc}
        if device != "cpu" or amp:
            meta.update(device_facts(resolve_device(device), amp=amp))
        atomic_write_text(d / BUILT, json.dumps(meta))
    return d


def ensure_defense(victim: VictimConfig, spec: Any, out: Path, device: str = "cpu", amp: bool = False) -> Path:
    """Build and save a defense (a :class:`~fortress.bench.grid.DefenseSpec`) on its victim once; return its directory.

    A defense whose class cannot be saved is recorded as unsaved and rebuilt (seeded) by each cell.
    An interrupted build restarts, resuming from its checkpoints where the build keeps them (DNF).
    """
    vdir = ensure_victim(victim, out, device, amp)
    d = Path(out) / ARTIFACTS / defense_artifact_key(victim, spec)
    if not (d / BUILT).is_file():
        log.info("building defense %s", d.name)
        model = load_model(vdir).to(resolve_device(device))
        defense = build_defense(spec.name, model, spec.params, BuildContext(data=victim.spec, out=d))
        try:
            if not (d / "defense.json").is_file():
                defense.save(d)
            saved = True
        except NotImplementedError:
            saved = False
        meta = {
            "kind": "defense",
            "name": spec.name,
            "params": to_dict(spec.params),
            "victim": vdir.name,
            "saved": saved,
        }
        atomic_write_text(d / BUILT, json.dumps(meta))
    return d


def load_cell_defense(cell: Cell, out: Path, device: str = "cpu", amp: bool = False) -> Defense:
    """The cell's defense on ``device``, loaded from its cached artifact (built first if missing)."""
    dev = resolve_device(device)
    d = ensure_defense(cell.victim, cell.defense, out, device, amp)
    if read_json(d / BUILT).get("saved"):
        return load_defense(d).to(dev)
    vdir = Path(out) / ARTIFACTS / cell.victim_key
    ctx = BuildContext(data=cell.victim.spec, out=None)
    return build_defense(cell.defense.name, load_model(vdir).to(dev), cell.defense.params, ctx)


# -- the task -------------------------------------------------------------------------------------


@torch.no_grad()
def _id_seconds_per_1k(defense: Defense, x: torch.Tensor, batch_size: int = 256) -> float:
    x = x.to(defense.device)
    defense.respond(x[:batch_size])  # warm-up: first calls pay allocation costs
    _sync(defense.device)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        defense.respond(x[i : i + batch_size])
    _sync(defense.device)
    return 1000.0 * (time.perf_counter() - t0) / x.shape[0]


def _sync(device: torch.device) -> None:
    """Wait for a GPU's queued work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cell(
    cell: Cell,
    out: Path | str,
    threads: int | None = None,
    after: object = None,
    device: str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """Run one cell and return its result record as plain data (the task both executors run).

    Args:
        cell: the cell.
        out: the run directory (artifacts are read from, and if missing built into, ``out/artifacts``).
        threads: torch threads for this task (``None``: leave as is).
        after: ignored; lets Ray make the task wait for an artifact build.
        device: where the cell computes (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        amp: bf16 autocast for the victim's training on a GPU (when this cell builds it).

    Returns:
        :meth:`ResultRecord.to_json` as a dict; the record's ``defense`` is the spec's label, its
        ``config`` holds the full cell and ``cell_key``, its ``extra`` the defense's time per 1,000 ID
        queries, its build's training seed (``defense_seed``; ``None`` for a defense that draws none) and
        the torch threads and version (results are bit-identical across processes at the same
        thread count). A closed-loop row (a ``monitor`` table) adds ``extra["monitor"]``: the flags
        (key, detector, the attacker's query index), keys flagged, degraded answers, the first flag,
        and ``id_test`` (whether a benign key replaying the ID test split was flagged, and when).
    """
    from fortress.bench.pipeline import id_data, run_attack

    del after
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    defense = load_cell_defense(cell, out, device, amp)
    test_x = id_data(cell.victim.spec).test.x
    loop = cell.defense.loop()
    id_test: dict[str, Any] = {}
    reference = guarded = None
    if loop is None:
        id_s = _id_seconds_per_1k(defense, test_x)
    else:
        make, id_test = _closed_loop(cell, out, defense, loop, test_x)
        id_s = _id_seconds_per_1k(make(), test_x)  # the answer and the monitoring, timed together
        reference = defense  # the evaluation (off-budget) runs on the DNF itself, never through a key
        defense = guarded = make()  # the attacker meets every key unflagged
    attack_args, knowledge = _defense_knowledge(cell, out)
    rec = run_attack(
        defense,
        cell.attack,
        reference=reference,
        data=cell.victim.spec,
        eval_every=cell.eval_every,
        device=defense.device,
        extra_config={
            "cell": cell.to_dict(),
            "cell_key": cell.key,
            "grid": cell.grid,
            "victim_artifact": cell.victim_key,
            "defense_artifact": cell.defense_key,
            **_matched(cell, out),
            **knowledge,
        },
        attack_args=attack_args,
    )
    seed = training_seed(cell.defense.name, cell.defense.params)
    facts: dict[str, Any] = {"id_s_per_1k_queries": id_s, "defense_seed": seed}
    if guarded is not None:
        facts["monitor"] = {**guarded.records(), "first_flag": guarded.first_flag(), "id_test": id_test}
    rec = replace(rec, defense=cell.defense.display, attack=cell.attack_display, extra={**rec.extra, **facts})
    data: dict[str, Any] = json.loads(rec.to_json())
    return data


def _closed_loop(
    cell: Cell, out: Path, dnf: Defense, loop: Any, test_x: torch.Tensor
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A maker of the cell's DNF behind fresh monitors, and how a benign key replaying the test split fares.

    The calibration is made on the defender's own data once per build and saved beside the DNF
    (``artifacts/<dnf>/monitor-<hash>/``). The benign key sends the ID test images in one stream
    (batches of 256) through a fresh loop: whether it is flagged, and at which query, is recorded
    (``id_test``); the attack meets another fresh loop.
    """
    from fortress.bench.pipeline import data_for
    from fortress.defenses import DNF
    from fortress.monitor.closed_loop import closed_loop, loop_calibration

    assert isinstance(dnf, DNF)  # DefenseSpec.loop() refuses a monitor table on anything else
    data = data_for(dnf.victim, cell.victim.spec)
    cal_dir = Path(out) / ARTIFACTS / cell.defense_key / f"monitor-{config_hash(loop.calibration_fields(), length=8)}"
    cal_dir.mkdir(parents=True, exist_ok=True)
    cals = loop_calibration(dnf, data.train.x, data.val.x, loop, cal_dir)
    guarded = closed_loop(dnf, replace(loop, keys=1, population=False), cals, budget=int(test_x.shape[0]))
    for i in range(0, test_x.shape[0], 256):
        guarded.respond(test_x[i : i + 256])
    benign = {"queries": int(test_x.shape[0]), "flagged_at": guarded.first_flag()}
    return (lambda: closed_loop(dnf, loop, cals, budget=cell.attack.budget)), benign


#: Added to the seed of an attack that simulates the defense, for what the attacker draws itself
#: (a surrogate's initialisation): never the defender's own seed by construction of the grid.
ATTACKER_SEED_OFFSET = 1000


def _defense_knowledge(cell: Cell, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """For an attack that takes the defense's algorithm (D-DAE): its ``perturb_factory`` and what it assumed.

    Built from the cell's defense as built and saved (algorithm and parameters, a matched strength
    included; not its weights, and a surrogate's seed chosen by the attacker):
    :func:`fortress.bench.shadow.assumed_defense`. Other attacks get nothing.
    """
    from fortress.bench.shadow import DEFENSE_ALGORITHM, assumed_defense, takes_defense_algorithm

    if not takes_defense_algorithm(cell.attack.name):
        return {}, {}
    factory, known = assumed_defense(
        cell.defense.name,
        cell.defense.params,
        Path(out) / ARTIFACTS / cell.defense_key,
        attacker_seed=ATTACKER_SEED_OFFSET + cell.attack.seed,
    )
    return {DEFENSE_ALGORITHM: factory}, {"defense_knowledge": known}


def _matched(cell: Cell, out: Path) -> dict[str, Any]:
    """``{"utility_match": ...}`` for a defense built to a matched utility, else nothing (records keep their form)."""
    found = read_utility_match(Path(out) / ARTIFACTS / cell.defense_key)
    return {} if found is None else {"utility_match": found}


def _ensure_victim_task(victim: VictimConfig, out: str, threads: int | None, device: str, amp: bool) -> str:
    if threads is not None:
        torch.set_num_threads(threads)
    return str(ensure_victim(victim, Path(out), device, amp))


def _ensure_defense_task(
    victim: VictimConfig, spec: Any, out: str, threads: int | None, after: object, device: str, amp: bool
) -> str:
    del after
    if threads is not None:
        torch.set_num_threads(threads)
    return str(ensure_defense(victim, spec, Path(out), device, amp))


# -- the driver -----------------------------------------------------------------------------------


def finished_keys(path: Path) -> set[str]:
    """Cell keys of the records in a ``results.jsonl`` (empty if the file does not exist)."""
    if not Path(path).is_file():
        return set()
    return {str(r.config["cell_key"]) for r in read_records(path) if "cell_key" in r.config}


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (an append killed mid-write) so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("dropping a torn last line of %s (%d bytes)", path, len(data) - keep)
    with path.open("r+b") as fh:
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


def _take_lock(out: Path) -> Path:
    lock = out / LOCK
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError, OSError):
            lock.unlink(missing_ok=True)  # left by a run that died
            return _take_lock(out)
        raise ConfigError(
            f"{out} is in use by another grid run (process {pid}); wait for it or remove {lock}"
        ) from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return lock


ProgressFn = Callable[[GridProgress], None]


def run_grid(
    grid: GridConfig,
    out: Path,
    *,
    executor: Executor = "local",
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    threads: int | None = None,
    num_cpus: int | None = None,
    ray_address: str | None = None,
    device: str = "cpu",
    amp: bool = False,
    gpus_per_cell: float = 0.0,
) -> GridRun:
    """Run every cell of ``grid`` not yet finished in ``out``, appending one record per cell.

    Args:
        grid: the grid.
        out: run directory: ``results.jsonl``, ``grid.toml`` (the grid as run), ``artifacts/``.
        executor: ``"local"`` (cells one after another in this process) or ``"ray"``.
        resume: skip cells whose records are already in ``out/results.jsonl``; without it an
            existing non-empty results file is an error (nothing is ever appended twice).
        on_progress: called with a :class:`GridProgress` at the start and after every cell.
        threads: torch threads per task (local default: unchanged; Ray always uses 1 per task).
        num_cpus: CPUs of a local Ray instance started here (default: all).
        ray_address: address of a running Ray cluster (default: start a local instance).
        device: where every build and cell computes (``auto``, ``cpu``, ``cuda``, ``cuda:N``,
            ``mps``); resolved before anything runs and recorded with every result. Under Ray a
            cell's GPU is the one Ray assigns it, so ``cuda:N`` reads as ``cuda`` there.
        amp: bf16 autocast for victim training on a GPU (recorded with the victim).
        gpus_per_cell: GPUs Ray reserves for each build and cell (fractions share a GPU; 0: none).

    Returns:
        A :class:`GridRun`; failed cells are listed there (and logged), the others still run.

    Raises:
        ConfigError: ``out`` holds results and ``resume`` is off, or another run holds ``out``.
        KeyboardInterrupt: passed on after in-flight Ray tasks are cancelled; finished records are kept.

    Example:
        >>> run = run_grid(load_grid(Path("benchmarks/mnist-quick.toml")), Path("out"))  # doctest: +SKIP
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; valid: local, ray")
    if gpus_per_cell < 0 or (gpus_per_cell and executor != "ray"):
        raise ConfigError(f"gpus_per_cell must be >= 0 and needs the ray executor, got {gpus_per_cell} ({executor})")
    if executor == "ray" and check_device(device).startswith("cuda") and not gpus_per_cell:
        raise ConfigError(f"device {device!r} under the ray executor needs gpus_per_cell > 0 (--gpus-per-cell)")
    if executor == "local" or ray_address is None:
        resolve_device(device)  # an unavailable device fails here, before any work
    else:
        check_device(device)  # the cluster's nodes, not this one, must have it
    out = Path(out)
    results = out / RESULTS
    cells = expand_grid(grid)
    out.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(out)
    try:
        _repair_tail(results)
        done_keys = finished_keys(results)
        if done_keys and not resume:
            raise ConfigError(f"{results} already holds {len(done_keys)} records; pass resume to continue that run")
        dump_toml(grid, out / "grid.toml")
        todo = [c for c in cells if c.key not in done_keys]
        run = GridRun(out=out, total=len(cells), skipped=len(cells) - len(todo))
        t0 = time.perf_counter()
        if executor == "local":
            _run_local(todo, out, run, on_progress, threads, device, amp)
        else:
            where = Placement(device, amp, gpus_per_cell)
            _run_ray(todo, out, run, on_progress, num_cpus, ray_address, where)
        run.wall_s = time.perf_counter() - t0
        return run
    finally:
        lock.unlink(missing_ok=True)


def _emit(fn: ProgressFn | None, run: GridRun, running: int, left: int, last: str | None = None) -> None:
    if fn is not None:
        done = run.skipped + len(run.records) + len(run.failed)
        fn(GridProgress(run.total, done, running, left, len(run.failed), last))


def _finish(run: GridRun, cell: Cell, data: dict[str, Any]) -> None:
    rec = ResultRecord.from_dict(data)
    append_record(run.out / RESULTS, rec)
    run.records.append(rec)
    log.info("finished %s: clone accuracy %s", cell.describe(), rec.clone_acc)


def _fail(run: GridRun, cell: Cell, exc: BaseException) -> None:
    log.error("cell %s failed: %s", cell.describe(), exc, exc_info=exc)
    run.failed.append((cell.describe(), f"{type(exc).__name__}: {exc}"))


def _run_local(
    todo: Sequence[Cell],
    out: Path,
    run: GridRun,
    on_progress: ProgressFn | None,
    threads: int | None,
    device: str = "cpu",
    amp: bool = False,
) -> None:
    before = torch.get_num_threads()
    try:
        for i, cell in enumerate(todo):
            _emit(on_progress, run, 1, len(todo) - i - 1)
            try:
                data = run_cell(cell, out, threads, None, device, amp)
            except Exception as exc:  # one broken cell must not stop a long grid; it is reported
                _fail(run, cell, exc)
            else:
                _finish(run, cell, data)
            _emit(on_progress, run, 0, len(todo) - i - 1, cell.describe())
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Placement:
    """Where Ray tasks compute: the device spec, bf16 autocast, and GPUs reserved per task."""

    device: str = "cpu"
    amp: bool = False
    gpus_per_cell: float = 0.0


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'fortress[dist]'") from None


def _run_ray(
    todo: Sequence[Cell],
    out: Path,
    run: GridRun,
    on_progress: ProgressFn | None,
    num_cpus: int | None,
    address: str | None,
    where: Placement,
) -> None:
    ray = _import_ray()
    device = "cuda" if where.device.startswith("cuda") else where.device  # Ray picks the GPU
    started = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        started = True
    pending: dict[Any, Cell] = {}
    try:
        gpus = where.gpus_per_cell
        victim_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_ensure_victim_task)
        defense_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_ensure_defense_task)
        cell_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(run_cell)
        victims: dict[str, Any] = {}
        defenses: dict[str, Any] = {}
        for c in todo:  # each artifact is built by exactly one task; cells wait for theirs
            if c.victim_key not in victims:
                victims[c.victim_key] = victim_task.remote(c.victim, str(out), 1, device, where.amp)
            if c.defense_key not in defenses:
                defenses[c.defense_key] = defense_task.remote(
                    c.victim, c.defense, str(out), 1, victims[c.victim_key], device, where.amp
                )
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if gpus:  # as many cells at once as the GPUs hold
            slots = min(slots, max(1, int(ray.cluster_resources().get("GPU", 0) / gpus)))
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < slots:
                c = queue.pop(0)
                pending[cell_task.remote(c, str(out), 1, defenses[c.defense_key], device, where.amp)] = c
            _emit(on_progress, run, len(pending), len(queue))
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    data = ray.get(ref)
                except Exception as exc:  # a RayTaskError wraps the cell's own error
                    _fail(run, cell, getattr(exc, "cause", None) or exc)
                else:
                    _finish(run, cell, data)
                _emit(on_progress, run, len(pending), len(queue), cell.describe())
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
