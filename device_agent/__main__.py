"""``python -m device_agent --config device.toml [--workload-hz 5]``: run one agent."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from device_agent.config import load_config
from device_agent.run import run_agent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m device_agent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    parser.add_argument("--workload-hz", type=float, default=0.0, help="synthetic inferences per second")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_agent(load_config(args.config), workload_hz=args.workload_hz)


if __name__ == "__main__":
    main()
