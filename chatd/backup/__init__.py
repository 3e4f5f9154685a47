"""Backups, restore and key rotation.

- :mod:`chatd.backup.keys`: the backup key (``backup.key`` or the systemd
  credential ``chatd-backup-key``), its key id, and retired backup keys.
- :mod:`chatd.backup.copy`: the consistent, chunked copy of one SQLCipher
  database into a new file under another key (online backup and restore),
  and what ``verify`` and ``holding`` read from a backup.
- :mod:`chatd.backup.archive`: the backup directory: names, listing, and
  which key opens which backup.
- :mod:`chatd.backup.service`: backup jobs inside ``chatd serve``.
- :mod:`chatd.backup.api`: the admin API routes under ``/v1/backups``.
- :mod:`chatd.backup.commands`: ``chatd backup ...``, ``chatd restore``,
  ``chatd rekey``.
"""
