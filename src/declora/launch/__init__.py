"""Launchers: torchrun ranks, a swarm peer and a local swarm, and the assembly of a swarm's result."""
