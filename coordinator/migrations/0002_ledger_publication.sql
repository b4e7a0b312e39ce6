-- What the sequencer publishes and how it resumes (CLUSTER.md, "The ledger:
-- one sequencer, fenced").

-- The signed checkpoint every node serves at /ledger/checkpoint. It only
-- moves forward: a sequencer that lost its lease during a pause cannot put an
-- older tree back over a newer one.
create table ledger_checkpoint (
    singleton boolean primary key default true check (singleton),
    tree_size bigint not null check (tree_size >= 0),
    note bytea not null check (octet_length(note) <= 65535)
);

-- The sequencer's fold of the first `tree_size` entries, so that a new
-- sequencer folds only the entries after the newest one instead of all.
create table sequencer_snapshots (
    tree_size bigint primary key check (tree_size >= 0),
    fold bytea not null,
    -- BLAKE3 of `fold`: a damaged snapshot is ignored (a full fold is always right).
    digest bytea not null check (octet_length(digest) = 32)
);
