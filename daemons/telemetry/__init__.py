"""Node telemetry: collector, ONNX autoencoder detector, trainer and the federated experiment."""
