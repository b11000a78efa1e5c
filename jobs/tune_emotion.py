"""Ray job entrypoint for the emotion search: `python jobs/tune_emotion.py --config jobs/configs/emotion_tune.yaml`."""

import sys

from mlplatform.cli import app

if __name__ == "__main__":
    app(["tune", "emotion", *sys.argv[1:]], prog_name="tune_emotion.py")
