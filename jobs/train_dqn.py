"""Ray job entrypoint for DQN: `python jobs/train_dqn.py --config jobs/configs/dqn_cartpole.yaml`."""

import sys

from mlplatform.cli import app

if __name__ == "__main__":
    app(["train", "dqn", *sys.argv[1:]], prog_name="train_dqn.py")
