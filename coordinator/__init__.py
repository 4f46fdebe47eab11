"""The coordinator process and its window policy: which layer goes into which ring slot, when."""
