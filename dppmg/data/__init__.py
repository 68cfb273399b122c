"""Datasets: one processed format for every source (see DESIGN.md, "Processed dataset")."""
