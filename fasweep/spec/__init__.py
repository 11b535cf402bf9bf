"""Sweep specs, torch-free: a YAML spec read safely, validated (errors name the field path and YAML line or
`--set` flag) and expanded into every trial it runs.

Its modules, each importing only those before it: `model` (the pydantic classes of a spec), `reading` (bounded
YAML, line numbers, `--set`), `checks` (checks beyond field types; the conditions a stage makes), `contrasts` (the
comparisons a spec declares), `plan` (`parse_spec`, `load_spec`: a spec's `Plan` of trials).
"""
