"""GPU-side measurements. One entry point, `tasks.unit.run_unit`, takes a unit (one model × one precision with its
cells) and yields one row per cell. Nothing here imports ray or orchestrator."""
