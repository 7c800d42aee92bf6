"""Connection arguments for a SQLite metadata DB, imported by Airflow itself (``[database]
sql_alchemy_connect_args``, an import path): nothing here may import Airflow or the project.

Every Airflow process (api-server, scheduler, dag-processor, triggerer, the CLI's ``backfill create``) writes the
one SQLite file. pysqlite waits 5 s for a lock by default; a busy 2-core machine holds one longer (a backfill's
runs created beside a scheduler loop), and the loser fails its request with ``database is locked`` - the API's
500 "Database error". The wait below is SQLite's busy timeout, not a retry of anything.
"""

#: Seconds a connection waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 60

#: ``sqlite3.connect`` keyword arguments of the sync engine (Airflow adds ``check_same_thread`` to it).
CONNECT_ARGS = {"timeout": BUSY_TIMEOUT_S}

#: The same for the async engine (aiosqlite passes them on to ``sqlite3.connect``).
CONNECT_ARGS_ASYNC = {"timeout": BUSY_TIMEOUT_S}

#: Another metadata DB's (PostgreSQL): no extra arguments. A fresh dict per import is not needed: nothing is added
#: to it for a non-SQLite URL.
NONE: dict = {}
