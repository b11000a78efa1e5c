"""Reinforcement learning: Dueling Double DQN with prioritized replay, single-process and Ape-X."""
