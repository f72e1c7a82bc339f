"""The run folder: its file names and layout, atomic files, protection, provenance, checkpoint
integrity, adapters, plots."""
