-- Worker and job events (troop.workers, troop.jobs) projected by one node at
-- a time (coordinator/src/cluster/history.rs): each round's records, their
-- ids and the offsets they were read to commit in one transaction.

-- One row per worker ever seen: what its events add up to.
create table worker_history (
    worker text primary key check (worker like 'wrk\_%'),
    jobs_started bigint not null check (jobs_started >= 0),
    jobs_failed bigint not null check (jobs_failed >= 0),
    epochs bigint not null check (epochs >= 0),
    beats bigint not null check (beats >= 0),
    last_seen_ms bigint not null check (last_seen_ms >= 0)
);

-- The next Kafka offset to project, per topic partition. A round moves it
-- only from where it read (a compare-and-swap), so a projector that lost its
-- lead cannot apply a round twice.
create table history_offsets (
    topic text not null,
    partition integer not null check (partition >= 0),
    next_offset bigint not null check (next_offset >= 0),
    primary key (topic, partition)
);

-- Ids of the events applied: a record produced twice (a publisher that sent
-- again after losing its producer session) has one id and counts once. Kept
-- longer than the topics keep records (30 days), then pruned.
create table history_applied (
    event_id bytea primary key check (length(event_id) = 16),
    applied_at timestamptz not null default now()
);
create index history_applied_by_age on history_applied (applied_at);
