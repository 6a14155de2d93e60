"""Checks of deploy/: Dockerfiles, Kubernetes manifests, Prometheus rules and
the Grafana dashboard, against each other and against the running services."""
