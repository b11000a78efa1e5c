"""Ray Serve endpoints for registered models: a FastAPI ingress, batched emotion and DQN-policy deployments."""
