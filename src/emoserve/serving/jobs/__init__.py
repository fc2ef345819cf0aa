"""Jobs: long recordings accepted durably and scored in the background, resumed after a crash.

store.py     the jobs' rows and the SQL both stores share (`JobStore`): accept, claim under a lease,
             the plan, each scored segment, the end with its webhook event, cancel, delete, purge
sqlite.py    the default store: SQLite (write-ahead log) in jobs_dir
postgres.py  the store of several replicas: PostgreSQL (claims with FOR UPDATE SKIP LOCKED)
worker.py    `Jobs`: accepting (the audio fsync'd before the row commits), the workers that claim and
             score through the shared engine, the webhooks' delivery, the purge
"""
