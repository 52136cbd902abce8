"""Screens over the dashboard: vCPU detail, help, confirmation."""
