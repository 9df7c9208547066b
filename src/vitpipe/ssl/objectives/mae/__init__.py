"""The mae objective: ``objective.py`` holds its model, config section and SPEC."""
