"""The training loop: set-up, the round loop, the end of a run, what a run takes and returns,
callbacks, trackers and checkpoints."""
