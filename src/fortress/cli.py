"""The ``fortress`` command line: thin verbs over library calls (typer + rich).

This is the only module that configures logging and draws progress bars. Every
:class:`~fortress.errors.FortressError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fortress.errors import ConfigError, FortressError

if TYPE_CHECKING:
    from fortress.bench.runner import GridProgress

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="fortress",
    help="Protect image classifiers against model extraction with Dynamic Neural Fortresses, and measure defenses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# wide enough for the results table when output is piped or logged (a terminal keeps its own width)
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def _friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn library errors into one line on stderr and exit status 1; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FortressError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished results and checkpoints are kept", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@contextmanager
def _progress() -> Iterator[Callable[[str, float, float], None]]:
    """A rich progress display fed by ``update(stage, completed, total)`` callbacks."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, completed: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=completed, total=total)

        yield update


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _hist(h: Sequence[float]) -> str:
    return "/".join(f"{100 * v:.0f}" for v in h) if h else "—"


def _records_table(records: Sequence[Any], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "defense",
        "attack",
        "seed",
        "budget",
        "queries",
        "clone acc %",
        "best %",
        "fidelity %",
        "defended acc %",
        "exits: attack % (ID %)",
    ):
        table.add_column(col, justify="right" if col not in ("defense", "attack") else "left")
    for r in records:
        exits = "—" if not r.exit_hist_attack else f"{_hist(r.exit_hist_attack)} ({_hist(r.exit_hist_id)})"
        table.add_row(
            r.defense,
            r.attack,
            str(r.seed),
            f"{r.budget:,}",
            f"{r.queries_used:,}",
            _pct(r.clone_acc),
            _pct(r.clone_acc_best),
            _pct(r.clone_fidelity),
            _pct(r.defended_acc),
            exits,
        )
    return table


class ListWhat(str, Enum):
    """Registries ``fortress list`` can show."""

    attacks = "attacks"
    defenses = "defenses"
    models = "models"
    datasets = "datasets"
    monitors = "monitors"


@app.command("list")
@_friendly
def list_components(
    what: Annotated[ListWhat | None, typer.Argument(help="Which registry to list (default: all).")] = None,
) -> None:
    """List registered attacks, defenses, models, data sets and extraction monitors."""
    from fortress.attacks import ATTACKS
    from fortress.data.registry import DATASETS
    from fortress.defenses import DEFENSES
    from fortress.models import MODELS
    from fortress.monitor import MONITORS

    regs: dict[str, list[str]] = {
        "attacks": ATTACKS.names(),
        "defenses": DEFENSES.names(),
        "models": MODELS.names(),
        "datasets": DATASETS.names(),
        "monitors": MONITORS.names(),
    }
    for name, items in regs.items():
        if what is None or what.value == name:
            console.print(f"[bold]{name}[/]: " + ", ".join(items), highlight=False)


@app.command("train-victim")
@_friendly
def train_victim_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved victim.")],
    arch: Annotated[str, typer.Option(help="Model registry name.")] = "lenet5",
    epochs: Annotated[int, typer.Option(help="Training epochs (paper: 20).")] = 20,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train a victim on the embedded MNIST digits and save it (safetensors + JSON)."""
    from fortress.bench.pipeline import train_victim
    from fortress.config import VictimConfig

    cfg = VictimConfig(arch=arch, epochs=epochs, lr=lr, seed=seed)
    with _progress() as update:
        _, acc = train_victim(cfg, out, on_epoch=lambda e, _l, _a: update("train victim", e + 1, epochs))
    console.print(f"victim {arch}: ID test accuracy {100 * acc:.2f}% — saved to {out}", highlight=False)


@app.command("defend")
@_friendly
def defend_cmd(
    name: Annotated[str, typer.Argument(help="Defense registry name (see `fortress list defenses`).")],
    victim: Annotated[Path, typer.Argument(help="Directory of a saved victim.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the saved defense.")],
    param: Annotated[list[str] | None, typer.Option(help="Defense hyper-parameter KEY=VALUE.")] = None,
    fit: Annotated[
        bool, typer.Option(help="Train the defense's own parts on the ID data (MeCo, adaptive misinformation, ...).")
    ] = False,
    fit_param: Annotated[list[str] | None, typer.Option(help="Training option KEY=VALUE (implies --fit).")] = None,
) -> None:
    """Wrap a saved victim in a baseline defense (trained where it trains), save it and report its utility.

    DNF has its own verb, `fortress protect`.
    """
    from fortress.bench.build import BuildContext, build_defense
    from fortress.bench.pipeline import defended_accuracy, id_data
    from fortress.models import load_model

    if name == "dnf":
        raise ConfigError("DNF is built by `fortress protect VICTIM --out DIR` (exit heads, OOD generator)")
    params = _params(param or [])
    if fit or fit_param:
        params["fit"] = _params(fit_param or [])
    model = load_model(victim)
    out.mkdir(parents=True, exist_ok=True)
    with _progress() as update:
        update(f"build {name}", 0, 1)
        defense = build_defense(name, model, params, BuildContext(out=out))
        update(f"build {name}", 1, 1)
    defense.save(out)
    acc, _ = defended_accuracy(defense, id_data("mnist").test)
    console.print(f"{name} saved to {out}: defended ID test accuracy {100 * acc:.2f}%", highlight=False)


@app.command("protect")
@_friendly
def protect_cmd(
    victim: Annotated[Path, typer.Argument(help="Directory of a saved victim.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the protected model.")],
    config: Annotated[Path | None, typer.Option(help="ProtectConfig TOML (options below override it).")] = None,
    head: Annotated[str | None, typer.Option(help="Exit head kind: vib (paper) or plain.")] = None,
    epochs: Annotated[int | None, typer.Option(help="DNF training epochs (paper: 10).")] = None,
    ood: Annotated[str | None, typer.Option(help="OOD source: dcgan, proxy, noise or dcgan+noise.")] = None,
    thresholds: Annotated[str | None, typer.Option(help="Comma-separated per-head thresholds.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of DNF training.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from checkpoints in OUT/checkpoints.")] = True,
    search_thresholds: Annotated[
        bool, typer.Option(help="Search exit thresholds with SMAC3 after training (paper App. H).")
    ] = False,
    search_trials: Annotated[int | None, typer.Option(help="Threshold-search trials (default 50).")] = None,
) -> None:
    """Protect a saved victim with DNF: train exit heads on ID + OOD data, then save."""
    from dataclasses import replace

    from fortress.bench.pipeline import defended_accuracy, id_data, protect
    from fortress.config import ProtectConfig, load_toml
    from fortress.models import load_model

    cfg = load_toml(ProtectConfig, config) if config is not None else ProtectConfig()
    if head is not None:
        cfg = replace(cfg, head_kind=head)  # type: ignore[arg-type]
    if epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    if seed is not None:
        cfg = replace(cfg, train=replace(cfg.train, seed=seed), ood=replace(cfg.ood, seed=seed))
    if ood is not None:
        cfg = replace(cfg, ood=replace(cfg.ood, kind=ood))  # type: ignore[arg-type]
    thr = _floats(thresholds, "--thresholds")
    if thr is not None:
        cfg = replace(cfg, thresholds=thr)
    if search_thresholds or search_trials is not None:
        from fortress.defenses.dnf.threshold_search import ThresholdSearchConfig

        base = cfg.search or ThresholdSearchConfig()
        cfg = replace(cfg, search=base if search_trials is None else replace(base, n_trials=search_trials))
    model = load_model(victim)
    total = cfg.train.epochs
    with _progress() as update:
        dnf = protect(
            model,
            cfg,
            out=out,
            resume=resume,
            on_dcgan_epoch=lambda e, _g, _d: update("train OOD generator", e + 1, cfg.ood.dcgan_epochs),
            on_step=lambda s: update("train DNF exits", s.epoch + (s.step + 1) / s.steps_per_epoch, total),
        )
    test = id_data("mnist").test
    acc, hist = defended_accuracy(dnf, test)
    console.print(
        f"DNF saved to {out}: defended ID accuracy {100 * acc:.2f}%, ID exits (%) {_hist(hist)}, "
        f"thresholds {dnf.thresholds}",
        highlight=False,
    )


@app.command("attack")
@_friendly
def attack_cmd(
    name: Annotated[str, typer.Argument(help="Attack registry name (see `fortress list attacks`).")],
    target: Annotated[str, typer.Option(help="Directory of a saved defense or victim, or a server URL.")],
    budget: Annotated[int, typer.Option(help="Query budget.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for results.jsonl and the clone.")],
    clone: Annotated[str, typer.Option(help="Clone architecture (model registry name).")] = "lenet5",
    seed: Annotated[int, typer.Option(help="Attack seed.")] = 0,
    output_mode: Annotated[str, typer.Option(help="Oracle output: soft, hard or topk.")] = "soft",
    pool: Annotated[str | None, typer.Option(help="Attacker pool data set (attacks that need one).")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Extra attack hyper-parameter KEY=VALUE.")] = None,
    api_budget: Annotated[
        int | None, typer.Option(help="The target API's own query quota (default: the attack budget).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="FORTRESS_API_KEY", help="API key of a server target.")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Server targets: a local copy of the served model, for off-budget evaluation."),
    ] = None,
) -> None:
    """Run an extraction attack against a saved defense or a `fortress serve` URL; append its result record."""
    from fortress.bench.pipeline import run_attack
    from fortress.bench.records import append_record
    from fortress.config import AttackConfig
    from fortress.defenses import load_defense

    remote = target.startswith(("http://", "https://"))
    ref = None if reference is None else load_defense(reference)
    defense = target if remote else load_defense(Path(target))
    label = target if remote else getattr(defense, "name", target)
    cfg = AttackConfig(
        name=name,
        budget=budget,
        seed=seed,
        clone=clone,
        output_mode=output_mode,  # type: ignore[arg-type]
        pool=pool,
        params=_params(param or []),
    )
    with _progress() as update:
        rec = run_attack(
            defense,
            cfg,
            reference=ref,
            api_key=api_key,
            progress=lambda used, b: update(f"{name} vs {label}", used, b),
            extra_config={"target": str(target)},
            api_budget=api_budget,
        )
    append_record(out / "results.jsonl", rec)
    console.print(_records_table([rec], f"{name} against {target}"))
    console.print(f"record appended to {out / 'results.jsonl'}", highlight=False)


KeysFile = Annotated[
    Path, typer.Option("--keys", envvar="FORTRESS_KEYS", help="The SQLite key ledger (fortress keys init).")
]
DEFAULT_KEYS = Path("fortress-keys.db")


class ComputeMode(str, Enum):
    """DNF compute modes of ``fortress serve``."""

    dynamic = "dynamic"
    full = "full"
    padded = "padded"


@app.command("serve")
@_friendly
def serve_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Directory of a saved defense or victim.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    keys: KeysFile = DEFAULT_KEYS,
    compute: Annotated[
        ComputeMode, typer.Option(help="DNF: dynamic (fast; timing reveals the exit), full, or padded (see docs).")
    ] = ComputeMode.dynamic,
    max_batch: Annotated[int, typer.Option(help="Images per request at most.")] = 1024,
    max_body_mb: Annotated[float, typer.Option(help="Request body size limit (MiB).")] = 32.0,
    timeout: Annotated[float, typer.Option(help="Seconds to answer a batch (queueing included).")] = 30.0,
    workers: Annotated[int, typer.Option(help="Batches answered at once (threads).")] = 2,
    threads: Annotated[int, typer.Option(help="Torch intra-op threads per batch.")] = 1,
    monitor: Annotated[
        str | None, typer.Option(help="Extraction monitor: exit-sprt, prada, or both (exit-sprt+prada).")
    ] = None,
    monitor_calibration: Annotated[
        Path | None, typer.Option(help="exit-sprt calibration (fortress monitor calibrate).")
    ] = None,
    monitor_response: Annotated[
        str, typer.Option(help="For flagged keys: log, alert, throttle, degrade-label, degrade-exit0.")
    ] = "log",
    monitor_webhook: Annotated[str | None, typer.Option(help="URL the alert response POSTs to.")] = None,
    profiles: Annotated[bool, typer.Option(help="Keep per-key query profiles in the key ledger.")] = True,
    throttle: Annotated[float, typer.Option(help="throttle response: seconds of delay per image.")] = 0.01,
    pad_quantile: Annotated[
        float, typer.Option(help="padded compute: quantile of recent full-path times to pad to.")
    ] = 0.99,
    pad_window: Annotated[int, typer.Option(help="padded compute: full-path times kept per batch size.")] = 256,
) -> None:
    """Serve predictions over HTTP behind API keys and per-key query budgets (needs the serve extra)."""
    try:
        from fortress.serve.app import create_app
        from fortress.serve.protocol import run_server
    except ImportError as exc:
        raise ConfigError(f'fortress serve needs the serve extra: pip install "fortress[serve]" ({exc})') from None
    from fortress.serve.edge import ACCESS_LOGGER
    from fortress.serve.settings import ServeSettings

    settings = ServeSettings(
        model_dir=model_dir,
        keys_path=keys,
        compute=compute.value,
        max_batch=max_batch,
        max_body_bytes=int(max_body_mb * 2**20),
        request_timeout_s=timeout,
        inference_workers=workers,
        torch_threads=threads,
        profiles=profiles,
        monitor=monitor,
        monitor_calibration=monitor_calibration,
        monitor_response=monitor_response,
        monitor_webhook=monitor_webhook,
        throttle_s_per_query=throttle,
        pad_quantile=pad_quantile,
        pad_window=pad_window,
    )
    application = create_app(settings)
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    logging.getLogger("fortress.serve").setLevel(logging.INFO)
    err_console.print(f"serving {model_dir} on http://{host}:{port} (compute={compute.value}, keys {keys})")
    run_server(application, host=host, port=port)


keys_app = typer.Typer(help="Manage the API keys of `fortress serve` (budgets, output modes, revocation).")
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
@_friendly
def keys_init_cmd(path: Annotated[Path, typer.Argument(help="The new ledger file (must not exist).")]) -> None:
    """Create an empty key ledger; `serve` and the other `keys` verbs only open existing ones."""
    from fortress.serve.keys import init_ledger

    init_ledger(path)
    console.print(f"created key ledger {path}: add keys with `fortress keys add NAME --keys {path}`", highlight=False)


@keys_app.command("add")
@_friendly
def keys_add_cmd(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    keys: KeysFile = DEFAULT_KEYS,
    budget: Annotated[int | None, typer.Option(help="Query budget (default: unlimited).")] = None,
    output_mode: Annotated[str, typer.Option(help="What answers reveal: soft, hard or topk.")] = "soft",
    top_k: Annotated[int, typer.Option(help="k of the topk output mode.")] = 1,
    admin: Annotated[bool, typer.Option("--admin", help="May read /metrics.")] = False,
) -> None:
    """Create an API key; its secret is printed once and only its hash is stored."""
    from fortress.serve.keys import KeyStore

    store = KeyStore(keys)
    try:
        key, secret = store.add(name, budget=budget, output_mode=output_mode, top_k=top_k, admin=admin)
    finally:
        store.close()
    err_console.print(
        f"key {key.key_id} for {key.name!r}: budget {'unlimited' if key.budget is None else f'{key.budget:,}'}, "
        f"output {key.output_mode.value}{' (admin)' if key.admin else ''}. The secret below is shown only once:",
        highlight=False,
    )
    console.print(secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
@_friendly
def keys_list_cmd(keys: KeysFile = DEFAULT_KEYS) -> None:
    """List keys with their budgets and usage (never the secrets)."""
    from fortress.serve.keys import KeyStore

    store = KeyStore(keys)
    try:
        rows = store.list_keys()
    finally:
        store.close()
    table = Table(title=f"API keys in {keys}")
    for col in ("id", "name", "budget", "used", "left", "output", "admin", "created", "revoked"):
        table.add_column(col, justify="right" if col in ("budget", "used", "left") else "left")
    for k in rows:
        table.add_row(
            k.key_id,
            k.name,
            "∞" if k.budget is None else f"{k.budget:,}",
            f"{k.used:,}",
            "∞" if k.budget_left is None else f"{k.budget_left:,}",
            k.output_mode.value if k.output_mode.value != "topk" else f"top{k.top_k}",
            "yes" if k.admin else "",
            k.created_at,
            k.revoked_at or "",
        )
    console.print(table)


@keys_app.command("revoke")
@_friendly
def keys_revoke_cmd(
    key: Annotated[str, typer.Argument(help="Key id (or the name of exactly one active key).")],
    keys: KeysFile = DEFAULT_KEYS,
) -> None:
    """Revoke a key: the server answers it 403 from the next request on."""
    from fortress.serve.keys import KeyStore

    store = KeyStore(keys)
    try:
        rec = store.revoke(key)
    finally:
        store.close()
    console.print(f"revoked key {rec.key_id} ({rec.name!r}) at {rec.revoked_at}", highlight=False)


@keys_app.command("reset")
@_friendly
def keys_reset_cmd(
    key: Annotated[str, typer.Argument(help="Key id.")],
    keys: KeysFile = DEFAULT_KEYS,
) -> None:
    """Clear a key's monitor flag and evidence in the ledger (running servers drop theirs on the key's next request)."""
    from fortress.monitor import ProfileStore
    from fortress.serve.keys import KeyStore

    store, profiles = KeyStore(keys), ProfileStore(keys)
    try:
        rec = store.get(key)
        cleared = profiles.clear_flag(rec.key_id)
    finally:
        store.close()
        profiles.close()
    what = "flag and monitor evidence cleared" if cleared else "no query profile yet: nothing to clear"
    console.print(f"key {rec.key_id} ({rec.name!r}): {what}", highlight=False)


@keys_app.command("show")
@_friendly
def keys_show_cmd(
    key: Annotated[str, typer.Argument(help="Key id.")],
    keys: KeysFile = DEFAULT_KEYS,
) -> None:
    """Show a key's record and query profile (exits, entropy, confidence, monitor flag)."""
    from fortress.monitor import ProfileStore
    from fortress.serve.keys import KeyStore

    store, profiles = KeyStore(keys), ProfileStore(keys)
    try:
        rec, prof = store.get(key), profiles.load(key)
    finally:
        store.close()
        profiles.close()
    left = "∞" if rec.budget_left is None else f"{rec.budget_left:,}"
    console.print(f"key {rec.key_id} ({rec.name!r}): used {rec.used:,}, left {left}", highlight=False)
    if prof is None:
        console.print("no query profile yet", highlight=False)
        return
    p = prof["profile"]
    hist = "/".join(f"{100 * h:.1f}" for h in p["exit_hist"]) or "-"
    console.print(
        f"profile: {p['queries']:,} queries; exits (%) {hist}; entropy {p['entropy']['mean']:.3f} "
        f"± {p['entropy']['std']:.3f}; confidence {p['confidence']['mean']:.3f} ± {p['confidence']['std']:.3f}",
        highlight=False,
    )
    if prof["monitor"] is not None:
        flag = f"flagged at query {prof['flagged_at']:,}" if prof["flagged_at"] is not None else "not flagged"
        console.print(f"monitor {prof['monitor']}: {flag} (updated {prof['updated_at']})", highlight=False)


monitor_app = typer.Typer(help="Extraction monitoring of `fortress serve` (see docs/monitoring.md).")
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("calibrate")
@_friendly
def monitor_calibrate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Directory of a saved DNF.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")],
    alpha: Annotated[float, typer.Option(help="Share of ID keys flagged within --horizon queries.")] = 0.01,
    horizon: Annotated[int, typer.Option(help="Queries per ID key the rate refers to.")] = 10_000,
    views: Annotated[int, typer.Option(help="Shifted+noisy copies of each held-out image added.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the augmentation and the simulation.")] = 0,
) -> None:
    """Calibrate the exit-sprt monitor on held-out ID data (the embedded MNIST validation split)."""
    from fortress.bench.pipeline import id_data
    from fortress.defenses import load_defense
    from fortress.monitor import calibrate_from_defense
    from fortress.monitor.exit_sprt import light_views

    defense = load_defense(model_dir)
    x = light_views(id_data("mnist").val.x, views, seed=seed)
    cal = calibrate_from_defense(defense, x, alpha=alpha, horizon=horizon, seed=seed)
    cal.save(out)
    console.print(
        f"exit-sprt calibration: ID exits {list(cal.id_counts)} over {len(x):,} held-out queries, "
        f"threshold {cal.threshold:.3f} for alpha {alpha:g} within {horizon:,} queries -> {out}",
        highlight=False,
    )


class BenchExecutor(str, Enum):
    """Where ``fortress bench`` runs its cells."""

    local = "local"
    ray = "ray"


@app.command("bench")
@_friendly
def bench_cmd(
    config: Annotated[Path, typer.Argument(help="Grid TOML (see benchmarks/README.md).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: results.jsonl, artifacts/, grid.toml.")],
    executor: Annotated[BenchExecutor, typer.Option(help="local (this process) or ray (a Ray cluster).")] = (
        BenchExecutor.local
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Skip cells already in OUT/results.jsonl.")] = False,
    threads: Annotated[int, typer.Option(help="Torch threads per local task (Ray tasks use 1).")] = 1,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray instance (default: all).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster.")] = None,
) -> None:
    """Run a benchmark grid (defense × attack × budget × seed); one result record per cell."""
    from fortress.bench.grid import load_grid
    from fortress.bench.runner import run_grid

    grid = load_grid(config)
    t0 = time.perf_counter()
    with Progress(
        TextColumn("cells"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running {task.fields[running]} · left {task.fields[left]} · failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("cells", total=grid.num_cells, running=0, left=grid.num_cells, failed=0)

        def show(p: GridProgress) -> None:
            bar.update(task, completed=p.done, running=p.running, left=p.left, failed=p.failed)
            _log_progress(p, t0)

        run = run_grid(
            grid,
            out,
            executor="ray" if executor is BenchExecutor.ray else "local",
            resume=resume,
            threads=threads,
            num_cpus=num_cpus,
            ray_address=ray_address,
            on_progress=show,
        )
    console.print(
        f"grid {grid.name!r}: {len(run.records)} cells run, {run.skipped} already done, {len(run.failed)} failed "
        f"of {run.total} · {run.wall_s / 60:.1f} min · records in {out / 'results.jsonl'}",
        highlight=False,
    )
    for cell, error in run.failed:
        err_console.print(f"[bold red]failed:[/] {cell}: {error}", highlight=False)
    if run.failed:
        raise typer.Exit(1)


def _log_progress(p: GridProgress, t0: float) -> None:
    """Without a terminal (a log file, CI), one plain line per finished cell instead of the bar."""
    if err_console.is_terminal or p.last is None:
        return
    err_console.print(
        f"[{p.done}/{p.total}] {time.perf_counter() - t0:7.0f} s · running {p.running} · left {p.left} · "
        f"failed {p.failed} · finished {p.last}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("report")
@_friendly
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or its results.jsonl).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report directory (default RUN_DIR/report).")] = None,
) -> None:
    """Tables (Markdown + CSV) and plots from a run's result records alone."""
    from fortress.bench.report import make_report

    rep = make_report(run_dir, out)
    console.print(rep.tables["clone_accuracy"][0].read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(
        f"{rep.records} records → {rep.markdown} · tables: {', '.join(rep.tables)} (.md, .csv) · "
        f"plots: {', '.join(p.name for p in rep.plots)}",
        highlight=False,
    )


@app.command("bench-speed")
@_friendly
def bench_speed_cmd(
    target: Annotated[Path, typer.Argument(help="A saved DNF (or a saved victim: then dnf is skipped).")],
    defense: Annotated[list[str] | None, typer.Option(help="Defense to time (repeatable; default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per timed call.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed calls per defense and traffic.")] = 20,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the measurements as JSON.")] = None,
) -> None:
    """Per-query cost of every defense vs undefended, and forward_dynamic vs forward_all, in one run."""
    from fortress.bench.speed import bench_speed

    suite = bench_speed(target, defenses=defense, batch_size=batch_size, repeats=repeats)
    traffic = list(dict.fromkeys(c.traffic for c in suite.costs))
    table = Table(title=f"defense cost, ms per 1,000 queries (× undefended) · batch {batch_size}, {suite.threads} thr.")
    for col in ("defense", *traffic):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for name in dict.fromkeys(c.defense for c in suite.costs):
        cells = {c.traffic: c for c in suite.costs if c.defense == name}
        ratio = {t: "" if cells[t].ratio is None else f" (×{cells[t].ratio:.2f})" for t in traffic}
        table.add_row(name, *(f"{cells[t].ms_per_1k:.1f}{ratio[t]}" for t in traffic))
    console.print(table)
    if suite.forward:
        fwd = Table(title="forward_all vs forward_dynamic (median ms per batch; speed-up > 1: dynamic is faster)")
        for col in ("defense", "traffic", "all ms", "dynamic ms", "speed-up", "exits %"):
            fwd.add_column(col, justify="left" if col in ("defense", "traffic") else "right")
        for f in suite.forward:
            fwd.add_row(
                f["defense"],
                f["traffic"],
                f"{f['all_ms']:.2f}",
                f"{f['dynamic_ms']:.2f}",
                f"{f['speedup']:.2f}",
                _hist(f["exit_hist"]),
            )
        console.print(fwd)
    for name, why in suite.skipped.items():
        console.print(f"skipped {name}: {why}", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(suite.as_dict(), indent=2), encoding="utf-8")


@app.command("bench-timing")
@_friendly
def bench_timing_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A saved DNF (fortress protect).")],
    queries: Annotated[int, typer.Option(help="Single-image queries timed per mode (half ID, half noise).")] = 600,
    modes: Annotated[str, typer.Option(help="Comma-separated compute modes to serve.")] = "dynamic,full,padded",
    requests: Annotated[int, typer.Option(help="Batches in each throughput run.")] = 100,
    batch: Annotated[int, typer.Option(help="Images per batch in the throughput run.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Client threads in the throughput run.")] = 4,
    threads: Annotated[int, typer.Option(help="The server's torch threads.")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the queries and the train/test split.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Play the attacker on the exit-timing channel: infer DNF's exit from response time, per compute mode."""
    from fortress.bench.timing import bench_timing

    rep = bench_timing(
        model_dir,
        modes=[m.strip() for m in modes.split(",") if m.strip()],
        queries=queries,
        batch=batch,
        requests=requests,
        concurrency=concurrency,
        threads=threads,
        seed=seed,
    )
    exits = sorted({e for m in rep.modes for e in m.latency_by_exit})
    table = Table(title=f"exit inference from latency · {rep.queries} queries, exits {rep.exit_hist}")
    cols = ["mode", "exit 0? acc", "chance", "exit acc", "chance"]
    cols += [f"exit {e} p50 ms" for e in exits] + ["img/s", "CPU ms/1k img"]
    for col in cols:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for m in rep.modes:
        cpu = "—" if m.server_cpu_ms_per_1k is None else f"{m.server_cpu_ms_per_1k:.0f}"
        table.add_row(
            m.mode,
            f"{m.early.accuracy:.1%}",
            f"{m.early.chance:.1%}",
            f"{m.exit_index.accuracy:.1%}",
            f"{m.exit_index.chance:.1%}",
            *(f"{m.latency_by_exit[e]['p50_ms']:.2f}" if e in m.latency_by_exit else "—" for e in exits),
            f"{m.images_per_s:,.0f}",
            cpu,
        )
    console.print(table)
    console.print(f"throughput: batch {rep.batch}, {rep.concurrency} clients, {rep.threads} server thread(s)")
    if json_out is not None:
        json_out.write_text(json.dumps(rep.as_dict(), indent=2), encoding="utf-8")


@app.command("demo")
@_friendly
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A few minutes instead of < 30 on 2 CPU cores.")] = False,
    seeds: Annotated[str, typer.Option(help="Comma-separated attack seeds.")] = "0",
) -> None:
    """Train a LeNet-5 victim, protect it with DNF, attack both with DFME and Knockoff; print the table."""
    import torch

    from fortress.bench.demo import demo_config, run_demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed_list = tuple(int(s) for s in (_floats(seeds, "--seeds") or (0,)))
    cfg = demo_config(quick=quick, seeds=seed_list)
    with _progress() as update:
        result = run_demo(cfg, out, event=update)
    console.print(_records_table(result.records, f"fortress demo ({'quick' if quick else 'full'}), MNIST, LeNet-5"))
    console.print(
        f"victim ID accuracy {100 * result.victim_acc:.2f}% · results: {out / 'results.jsonl'} · "
        f"exit histograms: {result.plot} · {result.wall_s / 60:.1f} min",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
