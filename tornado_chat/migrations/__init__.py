"""Alembic migrations of the chat database, applied by ``Storage.open``.

There is no ``alembic.ini``: :func:`tornado_chat.storage.engine._alembic_config`
builds the configuration in code and passes an open connection in
``config.attributes["connection"]``. Revisions are written by hand (one file
per schema change in ``versions/``, never edited once released).
"""
