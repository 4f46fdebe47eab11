"""The control plane: the CLI/supervisor process and the coordinator's window policy."""
