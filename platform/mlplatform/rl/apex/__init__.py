"""Ape-X distributed DQN (Horgan et al. 2018, arXiv:1803.00933) on plain Ray core actors."""
