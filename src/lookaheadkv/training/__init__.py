"""Training the lookahead modules: prompt sources, self-generated targets, labels, loss and loop."""
