"""The transport-free request flow: compute model, metering, the error vocabulary and the engine."""
