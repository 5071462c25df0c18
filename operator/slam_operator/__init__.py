"""Kubernetes operator for the SLAMInference resource (kopf)."""
