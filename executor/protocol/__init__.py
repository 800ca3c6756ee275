"""Wire formats: what a Flyte backend hands the pod and reads back."""
