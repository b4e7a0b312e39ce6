-- What a node reads to answer the API (coordinator/src/cluster/reads.rs),
-- written by the sequencer in the same transaction as the entries.

-- The schedule an open hold was priced at: its settlement is charged at it.
-- Null only in a hold projected before this migration (none outside tests:
-- the ledger format is a draft until the first release); `replay` rebuilds it.
alter table holds add column schedule_version bigint check (schedule_version > 0);

-- Workers registered in the ledger: the key their receipts are signed with
-- and the account their earnings go to. (`workers` holds their history.)
create table worker_registrations (
    worker text primary key check (worker like 'wrk\_%'),
    worker_key bytea not null check (octet_length(worker_key) = 32),
    account text not null check (account like 'acct\_%')
);
