"""Privacy: the account export (GDPR Art. 15, 20) and erasure (Art. 17).

:mod:`chatd.privacy.export` streams everything the server holds about one
user as a ZIP of JSON files; :mod:`chatd.privacy.erasure` disables an
account at once and purges it after a grace period, issuing a receipt
signed as :mod:`chatd.privacy.receipts` describes.
"""
