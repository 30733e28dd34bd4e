"""`tunelab data`: a workbench whose outputs are ordinary data files `tunelab train` reads.

One module per subcommand (stats, dedup, decontaminate, filter, mix, synth, pairs); common.py holds the
shared reading, output and provenance code.
"""
