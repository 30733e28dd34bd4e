"""Training methods past SFT (`train.method`), each on a TRL trainer; see tunelab/methods/run.py."""
