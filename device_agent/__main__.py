"""``python -m device_agent --config device.toml [--workload-hz 5]``: run one agent."""

from __future__ import annotations

import argparse
from pathlib import Path

from device_agent.config import load_config
from device_agent.logs import setup_logging
from device_agent.run import run_agent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m device_agent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    parser.add_argument("--workload-hz", type=float, default=0.0, help="synthetic inferences per second")
    parser.add_argument("--log-level", default=None, help="overrides the config's log_level")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (ValueError, TypeError, OSError) as exc:
        parser.error(f"{args.config}: {exc}")
    setup_logging(config.log_format, args.log_level or config.log_level)
    run_agent(config, workload_hz=args.workload_hz)


if __name__ == "__main__":
    main()
