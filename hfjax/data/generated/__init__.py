"""Offline generators of the tasks' data, one module per task family, each giving rows in the
hub dataset's own schema (`hfjax.tasks` converts them with the hub source's format).

Every generator enumerates a fixed pool deterministically (no data seed: the seed only splits
the pool into train and test), from made-up entities, people and companies, so the items are
small but real: their answers are correct and follow from their text.
"""
