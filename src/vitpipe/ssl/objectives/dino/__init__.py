"""The dino objective: ``objective.py`` holds its model, config section and SPEC."""
