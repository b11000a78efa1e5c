"""Operations around training: experiment tracking, model registry and monitoring."""
