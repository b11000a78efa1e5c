"""Japanese emotion classification over WRIME's eight emotions, trained on Ray Train and tuned on Ray Tune."""
