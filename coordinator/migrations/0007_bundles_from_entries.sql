-- Entry bundles (tile/entries/...) are no longer stored in ledger_files: every
-- node builds them from ledger_entries, which already holds each entry once
-- (coordinator/src/cluster/ledger_store.rs). Storing them too wrote every
-- entry twice and rewrote the partial bundle at each checkpoint.
delete from ledger_files where path like 'tile/entries/%';
