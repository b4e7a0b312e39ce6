-- What a cluster node keeps a copy of (coordinator/src/cluster/directory.rs),
-- written by the sequencer in the same transaction as the entries.

-- API keys and bans carry the number of their last change, so that a node
-- reads only what changed since its last look. Only the sequencer writes
-- them, one transaction at a time, so a change numbered higher is never
-- visible before one numbered lower.
create sequence directory_changes;
alter table api_keys add column change_seq bigint not null default nextval('directory_changes');
alter table bans add column change_seq bigint not null default nextval('directory_changes');
create index api_keys_by_change on api_keys (change_seq);
create index bans_by_change on bans (change_seq);

-- The leaves that publish price schedules and keys: few, and every node
-- folds them all to know the prices and keys in force.
create table network_entries (
    leaf_index bigint primary key references ledger_entries (leaf_index)
);
