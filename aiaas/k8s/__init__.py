"""Kubernetes: render the kustomize overlays in deploy/k8s, apply them, report rollout status."""
