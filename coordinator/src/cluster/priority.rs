//! CPU priority of a node's background work: the partition logs' readers,
//! the history producer and consumer, and the `troop-background` runtime
//! (sequencer, history projector) run `cluster.background_nice` steps below
//! the threads that serve requests (the sequencer's order log with it, being
//! opened there). Not lowered: the owners' partition logs (a hold is durable
//! before its first token goes out) and the ownership group's consumer (a
//! starved member loses its partitions).
//!
//! Why: on a machine the node shares (with its broker and database, or just
//! busy), those threads woke in bursts right when the next request was being
//! placed, and each hop of that request waited for a CPU; with them lowered,
//! a request's hops go first and the background still gets every cycle the
//! requests leave (its batches grow when it runs less often). Measured in
//! BENCHMARKS.md ("Time to first token", runs 11 and 12).
//!
//! Linux only (a thread's nice value is its own there, and threads inherit
//! their creator's); elsewhere nothing changes. librdkafka starts its own
//! threads, so its clients are created on a short-lived thread already
//! lowered ([`create_in_background`]).

use std::sync::atomic::{AtomicI32, Ordering};

/// The largest nice value there is.
pub const MAX_NICE: i32 = 19;

/// Steps below normal for background threads; 0 leaves them as they are.
static BACKGROUND_NICE: AtomicI32 = AtomicI32::new(0);

/// Sets how far background threads started from now on are lowered (clamped
/// to 0..=19). A node sets it once, before it starts any of them.
pub fn set_background_nice(nice: i32) {
    BACKGROUND_NICE.store(nice.clamp(0, MAX_NICE), Ordering::SeqCst);
}

pub fn background_nice() -> i32 {
    BACKGROUND_NICE.load(Ordering::SeqCst)
}

/// Lowers the calling thread's priority by the background's steps (from
/// where it is, never above it: raising it back needs privileges).
pub fn lower_this_thread() {
    let steps = background_nice();
    if steps == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let lowered = getpriority_process(me)
            .and_then(|now| setpriority_process(me, (now + steps).min(MAX_NICE)));
        if let Err(e) = lowered {
            // Runs at normal priority: slower first tokens on a busy
            // machine, nothing wrong otherwise.
            tracing::warn!(error = %e, "could not lower a background thread's priority");
        }
    }
}

/// Runs `create` on a short-lived thread of background priority, so that the
/// threads it starts (librdkafka's) inherit that priority.
pub fn create_in_background<T: Send>(create: impl FnOnce() -> T + Send) -> T {
    if background_nice() == 0 {
        return create();
    }
    std::thread::scope(|scope| {
        let created = std::thread::Builder::new()
            .name("troop-create".into())
            .spawn_scoped(scope, || {
                lower_this_thread();
                create()
            })
            .expect("a thread to create a background client");
        created
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("own priority")
    }

    #[test]
    fn clients_are_created_on_a_lowered_thread_and_what_they_start_inherits_it() {
        set_background_nice(3);
        let caller = nice_of_this_thread();
        let (creator, started) = create_in_background(|| {
            let started = std::thread::spawn(nice_of_this_thread)
                .join()
                .expect("a thread");
            (nice_of_this_thread(), started)
        });
        assert_eq!(creator, (caller + 3).min(MAX_NICE));
        assert_eq!(
            started, creator,
            "a thread inherits its creator's nice value"
        );
        assert_eq!(
            nice_of_this_thread(),
            caller,
            "the caller is left as it was"
        );
        set_background_nice(0);
        assert_eq!(
            create_in_background(nice_of_this_thread),
            caller,
            "0 lowers nothing"
        );
    }
}
