"""Federated learning on Ray: virtual clients on an actor pool, pluggable strategies, DP-FedAvg with an accountant."""
