"""Ray job entrypoint for federated training: `python jobs/train_federated.py --config jobs/configs/federated_tiny.yaml`."""

import sys

from mlplatform.cli import app

if __name__ == "__main__":
    app(["train", "federated", *sys.argv[1:]], prog_name="train_federated.py")
