"""The `authopt` command: the group and its subcommands, one module per area.

serve, recommend: cli/serve.py · worker, broker: cli/worker.py · up, simulate: cli/play.py (the run
itself: cli/up.py; what it shows: cli/dashboard.py) · train, evaluate: cli/train.py · world: cli/world.py ·
log: cli/log.py · features: cli/features.py.
"""

from __future__ import annotations

import logging

import click

from cli.features import features
from cli.log import log
from cli.model import model
from cli.play import simulate, up
from cli.serve import recommend, serve
from cli.train import evaluate, train
from cli.worker import broker, worker
from cli.world import world

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
@click.version_option(package_name="authopt")
def main(log_level: str) -> None:
    """authopt: real-time payment authorization optimizer (routing and retry decisions over gRPC)."""
    from streams.broker import tie_to_parent

    tie_to_parent()  # a child of `authopt up`: ends with it
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _command in (
    serve,
    recommend,
    worker,
    broker,
    up,
    simulate,
    train,
    evaluate,
    world,
    log,
    model,
    features,
):
    main.add_command(_command)


if __name__ == "__main__":
    main()
