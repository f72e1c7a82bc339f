"""One client's local step: its state, optimizer, lr schedule, precision, guards, and DP-SGD with its batch sampling."""
