"""Ray job entrypoint for emotion training: `python jobs/train_emotion.py --config jobs/configs/emotion_train.yaml`."""

import sys

from mlplatform.cli import app

if __name__ == "__main__":
    app(["train", "emotion", *sys.argv[1:]], prog_name="train_emotion.py")
