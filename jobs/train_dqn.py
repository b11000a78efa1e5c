"""Ray job entrypoint for DQN and Ape-X: `python jobs/train_dqn.py --config jobs/configs/apex_cartpole.yaml`.

The config file's `algorithm` field (`dqn` or `apex`) picks the trainer; every other argument
goes to `mlplatform train <algorithm>` unchanged.
"""

import sys

from mlplatform.cli import app
from mlplatform.config import ConfigError, read_yaml_mapping


def algorithm_of(argv: list[str]) -> str:
    """The `algorithm` named in the `--config`/`-c` file, `dqn` when there is none."""
    for flag in ("--config", "-c"):
        if flag in argv[:-1]:
            return str(read_yaml_mapping(argv[argv.index(flag) + 1]).get("algorithm", "dqn"))
    return "dqn"


if __name__ == "__main__":
    arguments = sys.argv[1:]
    try:
        algorithm = algorithm_of(arguments)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app(["train", algorithm, *arguments], prog_name="train_dqn.py")
