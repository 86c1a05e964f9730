"""Serving verbs: ``serve``, the ``keys`` group (the API-key ledger) and the ``monitor`` group."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fortress.cli.base import DataOption, DataOptions, Device, app, console, data_spec, err_console, friendly
from fortress.errors import ConfigError

__all__ = ["ComputeMode", "keys_app", "monitor_app", "serve_cmd"]

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
@friendly
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
        str | None,
        typer.Option(
            help="Extraction monitor: exit-sprt, prada, dadd, step, or several joined by + (exit-sprt+dadd+step)."
        ),
    ] = None,
    monitor_calibration: Annotated[
        Path | None,
        typer.Option(help="exit-sprt calibration, or a bundle with dadd's (fortress monitor calibrate --dadd)."),
    ] = None,
    monitor_response: Annotated[
        str,
        typer.Option(
            help="For flagged keys: log, alert, throttle, degrade-label, degrade-exit0, misinform, misinform-id."
        ),
    ] = "log",
    monitor_webhook: Annotated[str | None, typer.Option(help="URL the alert response POSTs to.")] = None,
    profiles: Annotated[bool, typer.Option(help="Keep per-key query profiles in the key ledger.")] = True,
    throttle: Annotated[float, typer.Option(help="throttle response: seconds of delay per image.")] = 0.01,
    population_window: Annotated[
        float | None,
        typer.Option(help="Also test the drift of all keys created in each window of this many seconds (needs dadd)."),
    ] = None,
    population_min_queries: Annotated[
        int, typer.Option(help="Pooled queries of a window before the detectors across keys test it.")
    ] = 500,
    pad_quantile: Annotated[
        float, typer.Option(help="padded compute: quantile of recent full-path times to pad to.")
    ] = 0.99,
    pad_window: Annotated[int, typer.Option(help="padded compute: full-path times kept per batch size.")] = 256,
    device: Device = "cpu",
) -> None:
    """Serve predictions over HTTP behind API keys and per-key query budgets (needs the serve extra)."""
    try:
        from fortress.serve.app import create_app
        from fortress.serve.protocol import run_server
    except ImportError as exc:
        raise ConfigError(f'fortress serve needs the serve extra: pip install "fortress[serve]" ({exc})') from None
    from fortress.device import resolve_device
    from fortress.serve.edge import ACCESS_LOGGER
    from fortress.serve.settings import ServeSettings

    resolve_device(device)
    settings = ServeSettings(
        device=device,
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
        population_window_s=population_window,
        population_min_queries=population_min_queries,
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
@friendly
def keys_init_cmd(path: Annotated[Path, typer.Argument(help="The new ledger file (must not exist).")]) -> None:
    """Create an empty key ledger; `serve` and the other `keys` verbs only open existing ones."""
    from fortress.serve.keys import init_ledger

    init_ledger(path)
    console.print(f"created key ledger {path}: add keys with `fortress keys add NAME --keys {path}`", highlight=False)


@keys_app.command("add")
@friendly
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
@friendly
def keys_list_cmd(keys: KeysFile = DEFAULT_KEYS) -> None:
    """List keys with their budgets and usage (never the secrets)."""
    from fortress.bench.tables import keys_table
    from fortress.serve.keys import KeyStore

    store = KeyStore(keys)
    try:
        rows = store.list_keys()
    finally:
        store.close()
    console.print(keys_table(rows, keys))


@keys_app.command("revoke")
@friendly
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
@friendly
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
@friendly
def keys_show_cmd(
    key: Annotated[str, typer.Argument(help="Key id.")],
    keys: KeysFile = DEFAULT_KEYS,
) -> None:
    """Show a key's record and query profile (exits, entropy, confidence, monitor flag)."""
    from fortress.bench.tables import key_profile_lines
    from fortress.monitor import ProfileStore
    from fortress.serve.keys import KeyStore

    store, profiles = KeyStore(keys), ProfileStore(keys)
    try:
        rec, prof = store.get(key), profiles.load(key)
    finally:
        store.close()
        profiles.close()
    for line in key_profile_lines(rec, prof):
        console.print(line, highlight=False)


monitor_app = typer.Typer(help="Extraction monitoring of `fortress serve` (see docs/monitoring.md).")
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("calibrate")
@friendly
def monitor_calibrate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Directory of a saved DNF.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")],
    alpha: Annotated[float, typer.Option(help="Share of ID keys flagged within --horizon queries.")] = 0.01,
    horizon: Annotated[int, typer.Option(help="Queries per ID key the rate refers to.")] = 10_000,
    views: Annotated[int, typer.Option(help="Shifted+noisy copies of each held-out image added.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the augmentation and the simulation.")] = 0,
    dadd: Annotated[
        bool, typer.Option("--dadd", help="Also calibrate dadd; OUT becomes a bundle of both calibrations.")
    ] = False,
    dadd_horizon: Annotated[int, typer.Option(help="Queries per benign key dadd's rate refers to.")] = 1000,
    dadd_streams: Annotated[int, typer.Option(help="Simulated benign keys per dadd scenario.")] = 200,
    step: Annotated[
        bool, typer.Option("--step", help="Also calibrate step (JBDA-style small steps); OUT becomes a bundle.")
    ] = False,
    benign_shifts: Annotated[
        bool,
        typer.Option(
            "--benign-shifts/--no-benign-shifts",
            help="Hold exit-sprt's rate under every realistic shift and for single classes too.",
        ),
    ] = True,
    data: DataOption = None,
    data_option: DataOptions = None,
) -> None:
    """Calibrate the exit-sprt monitor (with --dadd and --step also those monitors) on held-out ID data."""
    from fortress.bench.steps import calibrate_saved

    spec = data_spec(data, data_option)
    made = calibrate_saved(
        model_dir,
        out,
        alpha=alpha,
        horizon=horizon,
        views=views,
        seed=seed,
        data=spec,
        dadd=dadd,
        dadd_horizon=dadd_horizon,
        dadd_streams=dadd_streams,
        step=step,
        benign_shifts=benign_shifts,
    )
    cal = made.calibration
    console.print(
        f"exit-sprt calibration: ID exits {list(cal.id_counts)} over {made.queries:,} held-out queries, "
        f"threshold {cal.threshold:.3f} for alpha {alpha:g} within {horizon:,} queries -> {out}",
        highlight=False,
    )
    if cal.per_scenario:
        worst = max(cal.per_scenario, key=cal.per_scenario.__getitem__)
        console.print(
            f"exit-sprt: {len(cal.per_scenario)} benign scenarios; the threshold is set by {worst!r} "
            f"(held-out data alone: {cal.per_scenario['id']:.3f})",
            highlight=False,
        )
    if made.dadd_threshold is not None:
        console.print(
            f"dadd calibration: threshold {made.dadd_threshold:.3f} for alpha {alpha:g} within {dadd_horizon:,} "
            f"queries in every benign scenario -> {out} (bundle)",
            highlight=False,
        )
    if made.step_threshold is not None:
        console.print(
            f"step calibration: threshold {made.step_threshold:.3f} (share of step queries) for alpha {alpha:g} "
            f"within 1,000 queries in every benign scenario -> {out} (bundle)",
            highlight=False,
        )
