"""declora: decentralized LoRA fine-tuning of language models (Dec-LoRA).

Peers train LoRA adapters on one shared frozen base model and average them with their graph
neighbours (gossip) instead of sending them to a server. Importing this package has no side effects;
the heavy libraries load when a command needs them.
"""

__version__ = "0.1.0"
