"""Workflow phases: diagnosis, optimization, significance, decision and their checklist gates."""
