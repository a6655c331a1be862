"""Kubernetes operator for LLMDeployment. Never imports torch."""
