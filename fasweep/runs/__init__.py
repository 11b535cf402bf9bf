"""fasweep.runs: the run record. `layout` names everything a sweep leaves in MLflow and storage (tags, statuses,
run names, files) and defines "best"; `writer` is the driver's one writer; `reader` the one reader; `lease` keeps
one launch of a sweep running at a time; `store` reaches an MLflow store."""
