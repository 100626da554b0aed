"""Federated averaging of the telemetry autoencoders over Flower (SuperLink supervisor)."""
