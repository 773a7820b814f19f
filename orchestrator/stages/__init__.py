"""The loop's stages, one module each: generate, rank, pairs, train, swap, evaluate."""
