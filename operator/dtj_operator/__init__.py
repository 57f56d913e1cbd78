"""The DecentralizedTrainingJob operator: API models, rendering, reconcile, status."""
