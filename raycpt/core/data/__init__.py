"""Data: corpora read in units (sources.py), the leakage guard, split and shards (shards.py), exact tokenisation
(tokenize.py), packed blocks, held-out sets and the mixture plans (blocks.py), the loop's prefetched micro-batches
(batches.py). Imports the ground floor and model/."""
