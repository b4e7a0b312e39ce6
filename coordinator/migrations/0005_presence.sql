-- What each node's workers offer per model (coordinator/src/cluster/presence.rs),
-- replaced by the node about every second and read by the others to relay
-- requests their own workers cannot take. Stamped with the database's clock
-- (never a node's), so that freshness does not depend on the nodes' clocks.
alter table worker_presence add column workers integer not null default 0 check (workers >= 0);
alter table worker_presence add column context_length bigint;

-- A node advertises itself as an incarnation (its name and a number drawn
-- at start), now by the database's clock too: the owners void the holds of
-- requests whose incarnation stopped advertising (it died, or restarted).
alter table nodes add column incarnation text not null default '';
