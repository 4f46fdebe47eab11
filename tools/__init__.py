"""Tools around the engine: the demo-model import, checkpoint makers, benchmarks, monitors."""
