"""Peers that lie: the attack suite (``byzantine.*``) and the wiring of robust mixing (``comm.robust``).

:mod:`~declora.byzantine.attacks` holds the pure attack functions, :mod:`~declora.byzantine.adversary`
replaces an attacker's outgoing message in the gossip step, :mod:`~declora.byzantine.defense` applies the
robust rule of :mod:`declora.mixing.robust` on what a peer received, and
:mod:`~declora.byzantine.suspects` counts and names the neighbours the rule keeps cutting.
"""
