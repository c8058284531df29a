"""Reliability campaign: load, faults and hostile input against a live service, measured.

``make campaign`` (``.venv/bin/python -m bench.campaign``) starts a private Postgres, a
private Redis and a small tmpfs for the media, runs the API (gunicorn) and Celery workers
on them, then drives the service over HTTP from loopback: many concurrent clients, a soak
of jobs while workers, the API, Redis and Postgres are killed and restarted, a full disk,
hostile input (schemathesis, pickles with code, hostile archives and paths, huge JSON,
other users' ids) and the token rules. It ends with a table of what was tried and what held,
printed and written to ``var/campaign/report.md``.
"""
