-- Projections of the event log for a cluster of coordinators (CLUSTER.md).
-- Kafka is the source of truth: every row here is rebuilt by
-- `troop-coordinator replay`. Amounts are integer micro-credits; running
-- totals are numeric(39,0) because they are u128 in the fold.

-- Where each consumer group is in each partition, written in the same
-- transaction as the effects of what it consumed (exactly-once effect).
create table consumer_offsets (
    consumer_group text not null,
    topic text not null,
    partition_id integer not null check (partition_id >= 0),
    next_offset bigint not null check (next_offset >= 0),
    primary key (consumer_group, topic, partition_id)
);

-- Ids of the events already applied: a redelivered record is skipped.
create table applied_events (
    event_id bytea primary key check (octet_length(event_id) = 16),
    topic text not null,
    partition_id integer not null,
    event_offset bigint not null
);

-- The ledger: one gap-free order over every partition, kept by the sequencer.
create table ledger_head (
    singleton boolean primary key default true check (singleton),
    tree_size bigint not null check (tree_size >= 0),
    -- The sequencer's fencing epoch: a new sequencer bumps it.
    sequencer_epoch bigint not null default 0
);
insert into ledger_head (tree_size) values (0);

create table ledger_entries (
    leaf_index bigint primary key check (leaf_index >= 0),
    partition_id integer not null,
    event_offset bigint not null,
    entry bytea not null check (octet_length(entry) <= 65535),
    unique (partition_id, event_offset)
);

-- Tiles, bundles and checkpoints as /ledger/ serves them (path → bytes).
create table ledger_files (
    path text primary key,
    body bytea not null
);

create table accounts (
    account text primary key check (account like 'acct\_%'),
    role text check (role in ('consumer', 'worker', 'treasury')),
    ledger_partition integer not null check (ledger_partition >= 0),
    debits_posted numeric(39, 0) not null default 0 check (debits_posted >= 0),
    credits_posted numeric(39, 0) not null default 0 check (credits_posted >= 0),
    debits_pending numeric(39, 0) not null default 0 check (debits_pending >= 0),
    -- Credits from settlements judged in other partitions, once sequenced:
    -- what the account's owner may count on (CLUSTER.md, "Credits from other
    -- partitions").
    external_credits numeric(39, 0) not null default 0 check (external_credits >= 0)
);

create table holds (
    hold text primary key check (hold like 'hold\_%'),
    account text not null references accounts (account),
    job text not null,
    model text not null,
    amount_micro bigint not null check (amount_micro > 0),
    expires_at_ms bigint not null,
    -- The node that serves the request: its holds are voided if it dies.
    origin_node text
);
create index holds_by_account on holds (account);

create table receipts (
    job text primary key check (job like 'job\_%'),
    leaf_index bigint not null references ledger_entries (leaf_index),
    consumer text not null,
    worker text not null,
    charged_micro bigint not null,
    worker_earned_micro bigint not null,
    fee_micro bigint not null
);

create table api_keys (
    key_id text primary key check (key_id like 'key\_%'),
    account text not null,
    -- Keyed BLAKE3 of the secret; the secret itself is never stored.
    secret_hash bytea not null check (octet_length(secret_hash) = 32),
    revoked boolean not null default false
);

create table bans (
    worker text primary key check (worker like 'wrk\_%'),
    at_ms bigint not null
);

create table workers (
    worker text primary key check (worker like 'wrk\_%'),
    jobs_started bigint not null default 0,
    jobs_failed bigint not null default 0,
    epochs bigint not null default 0,
    beats bigint not null default 0,
    last_seen_ms bigint not null default 0
);

-- Coordinator nodes: their internal address and when they last said so.
create table nodes (
    node text primary key,
    internal_url text not null,
    last_seen_ms bigint not null
);

-- Which node owns each ledger partition (from the consumer group's assignment).
create table partition_owners (
    partition_id integer primary key check (partition_id >= 0),
    node text not null,
    since_ms bigint not null
);

-- Free slots and speed per node and model, refreshed by each node about
-- every second, so that any node can place a job on any node's worker.
create table worker_presence (
    node text not null,
    model text not null,
    free_slots integer not null check (free_slots >= 0),
    milli_tokens_per_s bigint not null check (milli_tokens_per_s >= 0),
    updated_ms bigint not null,
    primary key (node, model)
);
