"""A researcher's own code for fasweep: a rule (`rules.ScaledSign`), a model (`models.lenet`), a data set
(`data.blobs`). Nothing in fasweep is edited to use them: a spec names them by import path (or, installed, by
the names this package registers in its pyproject.toml)."""
