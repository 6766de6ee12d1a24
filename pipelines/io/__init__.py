"""The job layer's I/O: the Delta table store, catalog reading and the URI policy, storage options.

`schemas/` holds the contracts these modules read and write (table schemas, records, errors); `workers/` never
imports from here, so the code that runs on engine workers stays storage-free.
"""
