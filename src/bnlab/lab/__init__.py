"""The lab: each claim of the Batch Normalization story as an experiment on real data."""
