"""What every `plora` command shares: error reporting, adapter options, the registry option."""

from __future__ import annotations

import functools
import signal

import click

from plora.cloud_backbone.adapter_config import DEFAULT_TARGETS, PROJECTIONS, TARGET_MODULES, PrivateLoRAConfig
from plora.storage.errors import PloraError

db_option = click.option("--db", help="Registry database URL (default: $PLORA_DB_URL or SQLite under $PLORA_HOME).")
_WIRE_DTYPE_NAMES = click.Choice(["float32", "bfloat16", "float16"])


def wire_options(command):
    """--wire-dtype and --cut-dtype, given to `command` as `wire`: their names, (exchanges, cut)."""

    @functools.wraps(command)
    def run(*args, wire_dtype, cut_dtype, **kwargs):
        return command(*args, wire=(wire_dtype, cut_dtype), **kwargs)

    run = click.option(
        "--cut-dtype", default="float32", show_default=True, type=_WIRE_DTYPE_NAMES,
        help="What the hidden state at the cut and its gradient cross the network in, once each way a pass. "
             "16-bit floats moved a token's log-probability by up to 0.071 (bfloat16) and 0.012 (float16) nats "
             "on the embedded backbone.")(run)
    return click.option(
        "--wire-dtype", default="float16", show_default=True, type=_WIRE_DTYPE_NAMES,
        help="What u, u·M and their gradients cross the network in, for a device on a service: once each way per "
             "adapted layer, so nearly all of a step's bytes. Device and cloud compute in float32; float16 halves "
             "the bytes (`plora bench wire` measures what it costs), float32 is exact.")(run)


def fail_cleanly(command):
    """Turn plora's own errors into one readable line (exit status 1), without a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PloraError as err:
            raise click.ClickException(f"{type(err).__name__}: {err}") from err

    return run


def stop_on_sigterm(command):
    """Take SIGTERM as Ctrl-C, so that a command told to stop (by kill, systemd, a container
    runtime) still stops what it started: a backbone service, Ray, Flower's processes, which
    run in sessions of their own and would otherwise outlive it."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return command(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run


def adapter_options(command):
    """The options that fix a PrivateLoRA configuration, shared by every command that makes one."""
    options = [
        click.option("--rank", default=64, show_default=True, help="r: width of u and of each r×r matrix M."),
        click.option(
            "--targets",
            default=",".join(DEFAULT_TARGETS),
            show_default=True,
            help=f"Comma-separated projections to adapt in every layer, from: {', '.join(TARGET_MODULES)}.",
        ),
        click.option(
            "--shared-a/--separate-a",
            default=False,
            show_default=True,
            help="Share one A among projections that read the same input (q/k/v, gate/up): one r-vector per group goes down instead of one per projection.",
        ),
        click.option("--scale", default=1.0, show_default=True, help="s in y + s·(x·A·M)·B."),
        click.option("--seed", default=0, show_default=True, help="Seed of the public projections A and B, when they are random."),
        click.option(
            "--projections",
            type=click.Choice(PROJECTIONS),
            default="random",
            show_default=True,
            help="How A and B are drawn: at random from --seed, or principal: each adapted projection's top r singular vectors "
            "(right ones for A, left ones for B), public like the weights they come from.",
        ),
        click.option(
            "--device-layers",
            default=0,
            show_default=True,
            help="How many of the first decoder layers run on the device. More layers hide the raw prompt embedding from the cloud "
            "(`plora audit` measures how much).",
        ),
        click.option(
            "--device-last-layers",
            default=0,
            show_default=True,
            help="How many of the last decoder layers run on the device, after the cloud's: the cloud then never sees the state "
            "the device's LM head reads.",
        ),
        click.option(
            "--adapt-layers",
            default="",
            help="Decoder layers to adapt, as ranges and numbers from 0 (e.g. 12-29 or 0,4-7); every layer if not given. "
            "Each adapted cloud layer costs a device round trip per group per pass, so fewer layers decode faster over a slow link.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def adapter_config(rank, targets, shared_a, scale, seed, projections, device_layers, device_last_layers,
                   adapt_layers) -> PrivateLoRAConfig:
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    return PrivateLoRAConfig(rank=rank, targets=names, shared_a=shared_a, scale=scale, seed=seed, projections=projections,
                             device_layers=device_layers, device_last_layers=device_last_layers,
                             adapt_layers=layer_numbers(adapt_layers))


def layer_numbers(text: str, option: str = "--adapt-layers") -> tuple[int, ...]:
    """'12-14,20' -> (12, 13, 14, 20); '' -> () (every layer). Errors name `option`."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a layer number or a range like 12-29", param_hint=option) from None
        if low < 0 or high < low:
            raise click.BadParameter(f"{part!r}: layers count from 0, and a range goes up", param_hint=option)
        layers.extend(range(low, high + 1))
    return tuple(layers)
